"""How the evaluate stage's time grows with the number of images, per metric, on Fashion-MNIST.

The demo's images (32 px, 1 channel) stand in for both sides: a fixed sample of the train split as
"generated" images with their labels, the test split as the reference, the whole train split
(60k) for the memorisation search. Each metric's time comes from the stage's own timings
(``metrics.json``) at several sizes; the Inception metrics are timed with random weights of the
right architecture (the time does not depend on the values), at sizes small enough for this CPU.
The figures for 50k generated images are extrapolated linearly from the largest measured size
(classifier training and Inception features are linear in the images; the memorisation search
is linear in the generated images for a fixed training set).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch

from infra import storage


def _random_inception(path: Path) -> None:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None

    empty = path.parent / "empty.pth"
    torch.save({}, empty)
    torch.save(Unloaded("inception-v3-compat", ["2048"], str(empty)).state_dict(), path)


def _run(images_uri: str, out: str, n: int, **fields) -> dict:
    from infra.devices import Resources
    from stages import evaluate

    cfg = evaluate.EvaluateConfig(
        generated_uri=images_uri,
        reference_uri=images_uri,
        reference_split="test",
        train_split="train",
        output_uri=out,
        max_images=n,
        resources=Resources(cpus_per_worker=float(os.cpu_count() or 1)),
        **fields,
    )
    t0 = time.perf_counter()
    res = evaluate.run(cfg, "bench")
    report = json.loads(storage.read_bytes(res.manifest.data_uris()[0]))
    return {"images": n, "wall_s": round(time.perf_counter() - t0, 1), **report["timings_s"]}


def run(quick: bool = False) -> dict:
    from infra.cluster import ensure_ray
    from tests.bench.data import fashion_mnist_shards

    sizes = [250, 500] if quick else [500, 1000, 2000]
    inception_sizes = [50] if quick else [100, 200]
    out: dict = {"data": "Fashion-MNIST 32 px (the demo's ingest settings)", "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["TAMING_LOCAL_DIR"] = str(tmp / "local")
        ensure_ray()
        images = fashion_mnist_shards(tmp, 70_000, 10_000).output_uri
        for n in sizes:  # classifier + memorisation, no Inception
            r = _run(images, str(tmp / f"e{n}"), n, inception="off")
            out["runs"].append({k: round(v, 1) if isinstance(v, float) else v for k, v in r.items()})
            print(out["runs"][-1])
        weights = tmp / "inception.pth"
        _random_inception(weights)
        for n in inception_sizes:
            r = _run(
                images,
                str(tmp / f"i{n}"),
                n,
                classifier=False,
                inception="required",
                inception_weights_uri=str(weights),
            )
            out["runs"].append({k: round(v, 1) if isinstance(v, float) else v for k, v in r.items()})
            print(out["runs"][-1])
    big = max((r for r in out["runs"] if "classifiers" in r), key=lambda r: r["images"])
    inc = max((r for r in out["runs"] if "inception" in r), key=lambda r: r["images"])
    scale = 50_000
    out["extrapolated_50k_s"] = {
        "classifiers": round(big["classifiers"] * scale / big["images"]),
        "memorization": round(big["memorization"] * scale / big["images"]),
        "inception": round(inc["inception"] * scale / inc["images"]),
    }
    print(out)
    return out
