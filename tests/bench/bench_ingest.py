"""Ingest throughput: 20k 64x64 JPEGs (Fashion-MNIST items, colourised) through the ingest stage on
the local Ray, against a plain single-process Pillow loop doing the same work on the same files
(decode, EXIF orientation, RGB, resize/crop, PNG encode, sha256 id, one Parquet file)."""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from infra.sources import FASHION_MNIST_URI as FASHION_MNIST


def make_jpegs(root: Path, n: int) -> None:
    from infra.sources import read_idx

    imgs = read_idx(f"{FASHION_MNIST}/train-images-idx3-ubyte.gz")
    labels = read_idx(f"{FASHION_MNIST}/train-labels-idx1-ubyte.gz")
    rng = np.random.default_rng(0)
    tint = rng.integers(64, 256, size=(10, 3))
    for i in range(n):
        rgb = (imgs[i, :, :, None].astype(np.uint16) * tint[labels[i]] // 255).astype(np.uint8)
        d = root / f"class{labels[i]}"
        d.mkdir(exist_ok=True)
        Image.fromarray(rgb, "RGB").resize((64, 64), Image.Resampling.BILINEAR).save(
            d / f"{i:05d}.jpg", quality=90
        )


def reference_loop(files: list[Path], out: Path, resolution: int) -> int:
    ids, pngs = [], []
    for f in files:
        data = f.read_bytes()
        im = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
        w, h = im.size
        s = resolution / min(w, h)
        im = im.resize(
            (max(resolution, round(w * s)), max(resolution, round(h * s))), Image.Resampling.BICUBIC
        )
        left, top = (im.width - resolution) // 2, (im.height - resolution) // 2
        im = im.crop((left, top, left + resolution, top + resolution))
        buf = io.BytesIO()
        im.save(buf, format="PNG", compress_level=1)
        ids.append(hashlib.sha256(str(f).encode() + b"\0" + data).hexdigest()[:32])
        pngs.append(buf.getvalue())
    pq.write_table(pa.table({"image_id": ids, "image": pngs}), out, compression="zstd")
    return len(ids)


def run(quick: bool = False) -> dict:
    n = 2_000 if quick else 20_000
    resolution = 64
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["TAMING_LOCAL_DIR"] = str(tmp / "local")  # embedded MLflow in the temp folder
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        src = tmp / "src"
        src.mkdir()
        make_jpegs(src, n)
        files = sorted(src.rglob("*.jpg"))

        t0 = time.perf_counter()
        assert reference_loop(files, tmp / "ref.parquet", resolution) == n
        ref_s = time.perf_counter() - t0

        from infra.cluster import ensure_ray
        from stages import ingest

        t0 = time.perf_counter()
        ensure_ray()
        ray_start_s = time.perf_counter() - t0
        # Cold: the first stage run on a fresh cluster also starts Ray's worker processes and creates
        # the MLflow database. Warm: the same work again (new output URI), as in a running system.
        timings = {}
        for name in ("cold", "warm"):
            cfg = ingest.IngestConfig(source_uri=str(src), output_uri=str(tmp / name), resolution=resolution)
            t0 = time.perf_counter()
            res = ingest.run(cfg, experiment="bench")
            timings[name] = time.perf_counter() - t0
            assert res.counts["written"] == n and not res.cached, res
    return {
        "images": n,
        "cpus": os.cpu_count(),
        "reference_images_per_s": round(n / ref_s, 1),
        "ingest_cold_images_per_s": round(n / timings["cold"], 1),
        "ingest_warm_images_per_s": round(n / timings["warm"], 1),
        "ratio_cold_over_reference": round(ref_s / timings["cold"], 2),
        "ratio_warm_over_reference": round(ref_s / timings["warm"], 2),
        "ray_init_s": round(ray_start_s, 1),
        "note": "ingest times include listing, the MLflow run, shard writes and the manifest; not ray.init",
    }
