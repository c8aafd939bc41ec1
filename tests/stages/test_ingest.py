"""The ingest stage through the real local Ray, MLflow server and S3 server."""

from __future__ import annotations

import gzip
import io as _io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from infra import io
from infra.imaging import png_to_array
from stages import ingest
from tests import images
from tests.killing import kill_stage_when

ROOT = Path(__file__).resolve().parents[2]
MAX_PIXELS = 100 * 100


def _reasons(manifest: io.Manifest) -> dict[str, str]:
    t = pa.concat_tables([io.read_parquet(u) for u in manifest.error_uris()])
    return {u.rsplit("/", 1)[-1]: r for u, r in zip(t["source_uri"].to_pylist(), t["reason"].to_pylist())}


def test_folder_with_every_bad_kind(stack, tmp_path, mlflow_client):
    good, bad = images.good_images(), images.bad_images(MAX_PIXELS)
    files = {f"cats/{k}": v for k, v in good.items()} | {f"dogs/{k}": v for k, (v, _) in bad.items()}
    files["dogs/extra.png"] = images.encode(images.noise(20, 20, "RGB", 11), "PNG")
    images.write_tree(tmp_path / "src", files)
    cfg = ingest.IngestConfig(
        source_uri=str(tmp_path / "src"),
        output_uri=str(tmp_path / "out"),
        resolution=16,
        max_pixels=MAX_PIXELS,
        rows_per_shard=4,
    )
    res = ingest.run(cfg, experiment="test-ingest")

    assert (res.read, res.written, res.rejected) == (len(files), len(good) + 1, len(bad))
    assert res.shards == -(-len(files) // 4) and not res.cached
    assert res.label_names == ["cats", "dogs"]
    reasons = _reasons(res.manifest)
    assert set(reasons) == set(bad)
    for name, (_, expected) in bad.items():
        assert reasons[name].startswith(expected), (name, reasons[name])

    t = io.read_committed_table(res.output_uri, verify=True)
    rows = {u.rsplit("/", 1)[-1]: r for u, r in zip(t["source_uri"].to_pylist(), t.to_pylist())}
    assert set(rows) == set(good) | {"extra.png"}
    assert len(set(t["image_id"].to_pylist())) == t.num_rows
    for r in rows.values():
        assert png_to_array(r["image"]).shape == (16, 16, 3)
        assert r["split"] in ("train", "val")
    assert {rows[k]["label"] for k in good} == {0} and rows["extra.png"]["label"] == 1
    assert (rows["rotated.jpg"]["width"], rows["rotated.jpg"]["height"]) == (24, 48)  # EXIF applied
    assert (png_to_array(rows["transparent.png"]["image"]) == 255).all()  # composited on white

    # the MLflow server recorded the counts on this stage's run
    run = mlflow_client.get_run(res.manifest.mlflow_run_id)
    assert run.data.metrics["ingest/read"] == len(files)
    assert run.data.metrics["ingest/rejected"] == len(bad)
    assert run.data.tags["output_uri"] == res.output_uri
    assert run.data.params["resolution"] == "16"
    artifacts = {a.path for a in mlflow_client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "previews", "rejected_reasons.json"} <= artifacts

    # same config again: a no-op returning the recorded result; another config: refused
    again = ingest.run(cfg, experiment="test-ingest")
    assert again.cached and again.manifest.created_at == res.manifest.created_at
    import dataclasses

    with pytest.raises(io.OutputConflictError):
        ingest.run(dataclasses.replace(cfg, resolution=32), experiment="test-ingest")
    # execution-only settings do not change the output's identity
    assert ingest.run(dataclasses.replace(cfg, batch_size=2, concurrency=1), experiment="test-ingest").cached


def test_s3_in_and_out(stack, s3_bucket, tmp_path):
    import s3fs

    images.write_tree(
        tmp_path / "src",
        {f"train/a/{i}.png": images.encode(images.noise(20, 24, "RGB", i), "PNG") for i in range(5)}
        | {"test/b/x.png": b""},
    )
    fs = s3fs.S3FileSystem()
    fs.put(str(tmp_path / "src") + "/", f"{s3_bucket}/raw/", recursive=True)
    cfg = ingest.IngestConfig(
        source_uri=f"{s3_bucket}/raw", output_uri=f"{s3_bucket}/images", resolution=8, channels=1
    )
    res = ingest.run(cfg, experiment="test-ingest")
    assert (res.read, res.written, res.rejected) == (6, 5, 1)
    assert fs.exists(f"{s3_bucket}/images/_SUCCESS.json")
    t = io.read_committed_table(f"{s3_bucket}/images", verify=True)
    assert set(t["split"].to_pylist()) == {"train"} and set(t["label"].to_pylist()) == {0}
    assert all(t["source_uri"].to_numpy().astype(str) != "") and png_to_array(
        t["image"][0].as_py()
    ).shape == (8, 8)
    assert ingest.run(cfg, experiment="test-ingest").cached


def test_parquet_source(stack, tmp_path):
    pngs = [images.encode(images.noise(30, 30, "RGB", i), "PNG") for i in range(6)]
    table = pa.table({"image": pngs + [b"junk"], "label": [3, 1, 4, 1, 5, 9, 2]})
    (tmp_path / "src").mkdir()
    pq.write_table(table.slice(0, 4), tmp_path / "src" / "a.parquet")
    pq.write_table(table.slice(4), tmp_path / "src" / "b.parquet")
    cfg = ingest.IngestConfig(
        source_uri=str(tmp_path / "src"), output_uri=str(tmp_path / "out"), resolution=8
    )
    res = ingest.run(cfg, experiment="test-ingest")
    assert (res.read, res.written, res.rejected) == (7, 6, 1)
    t = io.read_committed_table(res.output_uri).sort_by("source_uri")
    assert t["label"].to_pylist() == [3, 1, 4, 1, 5, 9]
    # a committed image shard folder is itself a valid Parquet source (read through its manifest)
    res2 = ingest.run(
        ingest.IngestConfig(source_uri=res.output_uri, output_uri=str(tmp_path / "out2"), resolution=4),
        experiment="test-ingest",
    )
    assert (res2.read, res2.written) == (6, 6)


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    path.write_bytes(gzip.compress(header + arr.astype(np.uint8).tobytes()))


def test_fashion_mnist_idx_layout(stack, tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "fmnist"
    src.mkdir()
    for prefix, n in (("train", 7), ("t10k", 3)):
        _write_idx(src / f"{prefix}-images-idx3-ubyte.gz", rng.integers(1, 256, (n, 28, 28)))
        _write_idx(src / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    cfg = ingest.IngestConfig(
        source_uri=str(src), output_uri=str(tmp_path / "out"), resolution=32, channels=1, resize="pad"
    )
    res = ingest.run(cfg, experiment="test-ingest")
    assert (res.read, res.written, res.rejected) == (10, 10, 0)
    assert res.label_names[0] == "T-shirt/top" and len(res.label_names) == 10
    t = io.read_committed_table(res.output_uri)
    assert sorted(t["split"].to_pylist()) == ["test"] * 3 + ["train"] * 7
    img = png_to_array(t["image"][0].as_py())
    assert img.shape == (32, 32) and (img[:2] == 0).all() and (img[2:30, 2:30] > 0).all()  # padded by 2
    assert (
        pq.read_schema(io.join(res.output_uri, res.manifest.files[0].path)).metadata[b"taming.channels"]
        == b"1"
    )


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").exists(), reason="dataset-fashion-mnist absent"
)
def test_real_fashion_mnist_listing():
    from infra import sources

    listing = sources.list_items("/usr/share/datasets/fashion-mnist")
    assert listing.format == "fashion_mnist" and len(listing.items) == 70_000
    assert sum(it["split"] == "test" for it in listing.items) == 10_000


def test_killed_run_leaves_nothing_visible_and_rerun_completes(stack, tmp_path):

    n_shards, per_shard = 6, 12
    images.write_tree(
        tmp_path / "src",
        {
            f"c/{i:03d}.png": images.encode(images.noise(384, 384, "RGB", i), "PNG")
            for i in range(n_shards * per_shard)
        },
    )
    out = tmp_path / "out"
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "run": {"experiment": "test-ingest"},
                "ingest": {
                    "source_uri": str(tmp_path / "src"),
                    "output_uri": str(out),
                    "resolution": 16,
                    "rows_per_shard": per_shard,
                    "concurrency": 1,
                },
            }
        )
    )
    kill_stage_when("stages.ingest", cfg_path, out, "_attempts/*/_shards/part-*.json")
    with pytest.raises(io.NotCommittedError):
        io.read_committed_table(str(out))
    from infra import sources

    with pytest.raises(io.NotCommittedError):  # as a source, the half-written output is refused too
        sources.list_items(str(out), "parquet")

    cfg = ingest.IngestConfig(
        source_uri=str(tmp_path / "src"), output_uri=str(out), resolution=16, rows_per_shard=per_shard
    )
    res = ingest.run(cfg, experiment="test-ingest")
    assert res.reused_shards >= 1 and res.shards == n_shards
    t = io.read_committed_table(str(out), verify=True)
    assert t.num_rows == n_shards * per_shard == res.written
    assert len(set(t["image_id"].to_pylist())) == t.num_rows  # no duplicates
    assert len(set(t["source_uri"].to_pylist())) == t.num_rows


def test_cli_help_and_bad_key(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "stages.ingest", "--help"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and "ingest.resolution" in out.stdout and "Fashion-MNIST" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "stages.ingest", "source_uri=/x", "ingest.resoluton=3"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "unknown config key ingest.resoluton" in bad.stderr


def test_decode_modes_direct():
    from infra.imaging import DecodeSpec, Rejected, decode

    spec = DecodeSpec(resolution=12, channels=1)
    for name, data in images.good_images().items():
        arr = png_to_array(decode(data, spec).png)
        assert arr.shape == (12, 12), name
    i16 = images.good_images()["deep16.png"]
    assert png_to_array(decode(i16, DecodeSpec(24, 1)).png).max() > 200  # 16-bit scaled, not clipped
    with pytest.raises(Rejected, match="too small"):
        decode(images.encode(Image.new("RGB", (5, 50)), "PNG"), spec)
    buf = _io.BytesIO()
    Image.new("RGB", (10, 10)).save(buf, "PNG")
    assert json.dumps(png_to_array(decode(buf.getvalue(), spec).png).tolist())  # enlarges small inputs
