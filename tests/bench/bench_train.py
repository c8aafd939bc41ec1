"""VQGAN training throughput (images/s) with 1 and 2 Ray Train workers on this machine: the demo
model (f4-small, 32x32, batch 64) on Fashion-MNIST, measured from the rank-0 `train/images_per_s`
metric after the first logging interval (start-up excluded)."""

from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path


def run(quick: bool = False) -> dict:
    from mlflow.tracking import MlflowClient

    from infra import tracking
    from infra.cluster import ensure_ray
    from infra.devices import Resources
    from stages import train_vqgan
    from tests.bench.data import fashion_mnist_shards

    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["TAMING_LOCAL_DIR"] = str(tmp / "local")
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        ensure_ray()
        images = fashion_mnist_shards(tmp, 12_000, 6_000)
        steps = 20 if quick else 60
        for workers in (1, 2):
            cfg = train_vqgan.TrainVQGANConfig(
                images_uri=images.output_uri,
                output_uri=str(tmp / f"vq{workers}"),
                steps=steps,
                batch_size=64,
                log_every=10,
                image_every=10_000,
                checkpoint_every=10_000,
                resources=Resources(workers=workers),
                val_images=500,
            )
            res = train_vqgan.run(cfg, "bench")
            hist = MlflowClient(tracking.tracking_uri()).get_metric_history(
                res.manifest.mlflow_run_id, "train/images_per_s"
            )
            rates = [m.value for m in sorted(hist, key=lambda m: m.step)][
                1:
            ]  # the first interval includes start-up
            out[f"workers_{workers}"] = {
                "images_per_s": round(statistics.median(rates), 1),
                "steps": steps,
                "wall_s_incl_startup_and_val": round(res.figures["train_seconds"], 1),
            }
            print(out)
    out["speedup_2_over_1"] = round(out["workers_2"]["images_per_s"] / out["workers_1"]["images_per_s"], 2)
    return out
