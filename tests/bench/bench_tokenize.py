"""Tokenization throughput: the stage (Ray actor pool, one model per actor) against a bare
single-process torch loop over the same image shards in the same run; bytes per code on disk.

1. The demo tokenizer (preset ``f4-small``: 1 channel, 32x32 -> 8x8 codes, 512 codes) on 20k
   Fashion-MNIST images (2 shards of 10k, 2 actors of 1 CPU each; the loop uses both cores).
2. The official f16 config (256x256 -> 16x16 codes, 1024 codes) on 64 RGB images.
Random weights: the codes are not those of a trained tokenizer (their entropy is higher).

The loop is the plain code a user would write, at the stage's default batch size (``auto_batch_size``)
so that both do the same work: it feeds ``pngs_to_array``'s output as is, which is channels-last
memory (an NHWC view); the stage runs channels-last too (NCHW was ~20% slower on CPU for the f16
encoder).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from infra import code_shards, image_shards, schemas, stage, storage
from infra.devices import Resources, auto_batch_size
from infra.imaging import pngs_to_array
from models import checkpoint
from models.vqgan import PRESETS, VQGAN
from stages import ingest, tokenize_images
from stages.tokenize_images import TokenizeConfig
from tests.bench.data import fashion_mnist_shards


def bare_loop(images_uri: str, model: VQGAN, batch: int) -> int:
    n = 0
    with torch.inference_mode():
        for uri in stage.read_manifest(images_uri).data_uris():
            t = storage.read_parquet(uri, ["image_id", "image"])
            x = pngs_to_array(schemas.image_bytes(t["image"]), model.config.in_channels)
            codes = [model.encode(torch.from_numpy(x[i : i + batch]))[2] for i in range(0, len(x), batch)]
            n += int(sum(len(c) for c in codes))
    return n


def one(name: str, tmp: Path, images_uri: str, model: VQGAN, concurrency: int, num_cpus: float) -> dict:
    """Loop, stage (cold), loop, stage (warm): the two loops bracket the stage runs, so a slow spell of
    this shared machine shows as a spread between them rather than as Ray overhead."""
    ckpt = tmp / f"{name}.safetensors"
    checkpoint.save_native(model, ckpt)
    images = stage.read_manifest(images_uri)
    n = sum(f.rows for f in images.files)
    side = image_shards.describe(images).resolution
    batch = auto_batch_size(side, side, "cpu")  # the stage's default; the loop does the same work
    loops, stages = [], {}
    for attempt in ("cold", "warm"):  # cold: actor start and model load included
        torch.set_num_threads(os.cpu_count() or 1)
        t0 = time.perf_counter()
        assert bare_loop(images_uri, model, batch) == n
        loops.append(time.perf_counter() - t0)
        cfg = TokenizeConfig(
            tokenizer_uri=str(ckpt),
            images_uri=images_uri,
            output_uri=str(tmp / f"{name}-{attempt}"),
            resources=Resources(workers=concurrency, cpus_per_worker=num_cpus),
        )
        t0 = time.perf_counter()
        res = tokenize_images.run(cfg, "bench")
        stages[attempt] = time.perf_counter() - t0
    loop_s = sum(loops) / len(loops)
    return {
        "images": n,
        "batch_size": batch,
        "bare_loop_seconds": [round(t, 2) for t in loops],
        "bare_loop_images_per_s": round(n / loop_s, 2),
        "stage_images_per_s": round(n / stages["warm"], 2),
        "stage_cold_images_per_s": round(n / stages["cold"], 2),
        "ray_overhead_pct": round(100 * (stages["warm"] / loop_s - 1), 1),
        "ray_overhead_cold_pct": round(100 * (stages["cold"] / loop_s - 1), 1),
        "bytes_per_code_codes_column": round(res.figures["bytes_per_code"], 3),
        "bytes_per_code_whole_files": round(res.figures["file_bytes_per_code"], 3),
        "grid": list(code_shards.describe(res.manifest).grid),
    }


def run(quick: bool = False) -> dict:
    from infra.cluster import ensure_ray

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["TAMING_LOCAL_DIR"] = str(tmp / "local")
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        ensure_ray()
        n = 2_000 if quick else 20_000
        small = fashion_mnist_shards(tmp, n, n // 2)
        torch.manual_seed(0)
        out["demo_f4_small_32px"] = one(
            "small", tmp, small.output_uri, VQGAN(PRESETS["f4-small"]).eval(), 2, 1.0
        )
        print(out)
        rng = np.random.default_rng(0)
        from PIL import Image

        src = tmp / "rgb"
        src.mkdir()
        k = 8 if quick else 64
        for i in range(k):
            Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(src / f"{i}.png")
        big = ingest.run(
            ingest.IngestConfig(
                source_uri=str(src), output_uri=str(tmp / "big"), resolution=256, rows_per_shard=k // 2
            ),
            "bench",
        )
        out["official_f16_256px"] = one("f16", tmp, big.output_uri, VQGAN(PRESETS["f16-1024"]).eval(), 2, 1.0)
        print(out)
    return out
