"""The ingest stage through the real local Ray, MLflow server and S3 server."""

from __future__ import annotations

import gzip
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

from infra import image_shards, schemas, sources, stage, storage
from infra.imaging import png_to_array
from stages import ingest
from tests import images
from tests.killing import kill_stage_when

ROOT = Path(__file__).resolve().parents[2]
MAX_PIXELS = 100 * 100


def _rwr(res) -> tuple[int, int, int]:
    return res.counts["read"], res.counts["written"], res.counts["rejected"]


def _reasons(manifest: stage.Manifest) -> dict[str, str]:
    t = pa.concat_tables([storage.read_parquet(u) for u in manifest.error_uris()])
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

    assert _rwr(res) == (len(files), len(good) + 1, len(bad))
    assert res.counts["shards"] == -(-len(files) // 4) and not res.cached
    assert image_shards.describe(res.manifest).label_names == ["cats", "dogs"]
    reasons = _reasons(res.manifest)
    assert set(reasons) == set(bad)
    for name, (_, expected) in bad.items():
        assert reasons[name].startswith(expected), (name, reasons[name])

    t = stage.read_committed_table(res.output_uri, verify=True)
    rows = {u.rsplit("/", 1)[-1]: r for u, r in zip(t["source_uri"].to_pylist(), t.to_pylist())}
    assert set(rows) == set(good) | {"extra.png"}
    assert len(set(t["image_id"].to_pylist())) == t.num_rows
    for r in rows.values():
        assert png_to_array(r["image"]["bytes"]).shape == (16, 16, 3)
        assert r["split"] in ("train", "val")
    assert {rows[k]["label"] for k in good} == {0} and rows["extra.png"]["label"] == 1
    assert (rows["rotated.jpg"]["source_width"], rows["rotated.jpg"]["source_height"]) == (24, 48)  # EXIF
    assert (png_to_array(rows["transparent.png"]["image"]["bytes"]) == 255).all()  # composited on white

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

    with pytest.raises(stage.OutputConflictError):
        ingest.run(dataclasses.replace(cfg, resolution=32), experiment="test-ingest")
    assert res.summary()["written"] == len(good) + 1 and res.summary()["stage"] == "ingest"
    # execution-only settings do not change the output's identity
    from infra.devices import Resources

    faster = dataclasses.replace(cfg, batch_size=2, resources=Resources(workers=1))
    assert ingest.run(faster, experiment="test-ingest").cached


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
    assert _rwr(res) == (6, 5, 1)
    assert fs.exists(f"{s3_bucket}/images/_SUCCESS.json")
    t = stage.read_committed_table(f"{s3_bucket}/images", verify=True)
    assert set(t["split"].to_pylist()) == {"train"} and set(t["label"].to_pylist()) == {0}
    assert all(t["source_uri"].to_numpy().astype(str) != "")
    assert png_to_array(schemas.image_bytes(t["image"])[0]).shape == (8, 8)
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
    assert _rwr(res) == (7, 6, 1)
    t = stage.read_committed_table(res.output_uri).sort_by("source_uri")
    assert t["label"].to_pylist() == [3, 1, 4, 1, 5, 9]
    # a committed image shard folder is itself a valid Parquet source (read through its manifest)
    res2 = ingest.run(
        ingest.IngestConfig(source_uri=res.output_uri, output_uri=str(tmp_path / "out2"), resolution=4),
        experiment="test-ingest",
    )
    assert _rwr(res2) == (6, 6, 0)


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
    assert _rwr(res) == (10, 10, 0)
    described = image_shards.describe(res.manifest)
    names = described.label_names
    assert names[0] == "T-shirt/top" and len(names) == 10 and described.channels == 1
    t = stage.read_committed_table(res.output_uri)
    assert sorted(t["split"].to_pylist()) == ["test"] * 3 + ["train"] * 7
    assert {f.split for f in res.manifest.files} == {"train", "test"}  # a file per split
    img = png_to_array(schemas.image_bytes(t["image"])[0])
    assert img.shape == (32, 32) and (img[:2] == 0).all() and (img[2:30, 2:30] > 0).all()  # padded by 2
    footer = pq.read_schema(storage.join(res.output_uri, res.manifest.files[0].path)).metadata
    assert json.loads(footer[schemas.DESCRIPTOR_KEY.encode()]) == described.to_json()  # the same descriptor


@pytest.mark.skipif(not Path(sources.FASHION_MNIST_URI).exists(), reason="dataset-fashion-mnist absent")
def test_real_fashion_mnist_listing():
    listing = sources.list_items(sources.FASHION_MNIST_URI)
    assert listing.format == "fashion_mnist" and len(listing.items) == 70_000
    assert sum(it.split == "test" for it in listing.items) == 10_000


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
                    "resources": {"workers": 1},
                },
            }
        )
    )
    kill_stage_when("stages.ingest", cfg_path, out, ".attempts/*/_shards/part-*.json")
    with pytest.raises(stage.NotCommittedError):
        stage.read_committed_table(str(out))
    with pytest.raises(stage.NotCommittedError):  # as a source, the half-written output is refused too
        sources.list_items(str(out), "parquet")

    cfg = ingest.IngestConfig(
        source_uri=str(tmp_path / "src"), output_uri=str(out), resolution=16, rows_per_shard=per_shard
    )
    res = ingest.run(cfg, experiment="test-ingest")
    assert res.counts["reused_shards"] >= 1 and res.counts["shards"] == n_shards
    t = stage.read_committed_table(str(out), verify=True)
    assert t.num_rows == n_shards * per_shard == res.counts["written"]
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
    assert out.returncode == 0 and "\n  resolution = 64\n" in out.stdout and "Fashion-MNIST" in out.stdout
    assert "\n  resources.workers = None   [execution]\n" in out.stdout  # nested keys, with their role
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
    # small inputs are enlarged to the resolution (crop mode), not padded: a 10x10 image whose left
    # half is black and right half white becomes 12x12 with the same halves
    half = np.zeros((10, 10), np.uint8)
    half[:, 5:] = 255
    big = png_to_array(decode(images.encode(Image.fromarray(half, "L"), "PNG"), spec).png)
    assert big.shape == (12, 12)
    assert (big[:, :5] < 64).all() and (big[:, 7:] > 191).all()  # no border: the image fills the frame


def _class_folders(root: Path, classes: str = "abcd", per_class: int = 12) -> Path:
    """A folder dataset whose files sort by class: root/a/000.png ... root/d/011.png."""
    images.write_tree(
        root,
        {
            f"{c}/{i:03d}.png": images.encode(images.noise(12, 12, "RGB", 100 * k + i), "PNG")
            for k, c in enumerate(classes)
            for i in range(per_class)
        },
    )
    return root


def test_shards_mix_the_classes_and_max_images_samples_all(stack, tmp_path):
    """A class-per-folder source is not written in class order: every shard mixes the classes (a
    trainer reading shard by shard sees all of them early), and max_images keeps every class."""
    src = _class_folders(tmp_path / "src")
    res = ingest.run(
        ingest.IngestConfig(
            source_uri=str(src), output_uri=str(tmp_path / "out"), resolution=8, rows_per_shard=12
        ),
        "test-ingest",
    )
    per_shard = [
        storage.read_parquet(u, ["label"])["label"].to_pylist() for u in res.manifest.data_uris("train")
    ]
    assert len(per_shard) == 4 and all(len(set(labels)) >= 3 for labels in per_shard), per_shard
    first = per_shard[0][:8]
    assert len(set(first)) >= 3, first  # the first rows a reader sees are not one class
    few = ingest.run(
        ingest.IngestConfig(
            source_uri=str(src), output_uri=str(tmp_path / "few"), resolution=8, max_images=8
        ),
        "test-ingest",
    )
    labels = stage.read_committed_table(few.output_uri, ["label"])["label"].to_pylist()
    assert len(labels) == 8 and len(set(labels)) >= 3, labels  # not the first two folders


def test_identity_covers_the_source_listing(stack, tmp_path):
    """Adding a file to (or changing one in) a source folder is new work, not a stale no-op."""
    src = _class_folders(tmp_path / "src", "ab", 3)
    cfg = ingest.IngestConfig(source_uri=str(src), output_uri=str(tmp_path / "out"), resolution=8)
    first = ingest.run(cfg, "test-ingest")
    assert ingest.run(cfg, "test-ingest").cached  # nothing changed: a no-op
    (src / "b" / "new.png").write_bytes(images.encode(images.noise(12, 12, "RGB", 999), "PNG"))
    with pytest.raises(stage.OutputConflictError):  # the committed output is of the old listing
        ingest.run(cfg, "test-ingest")
    grown = ingest.run(
        ingest.IngestConfig(source_uri=str(src), output_uri=str(tmp_path / "out2"), resolution=8),
        "test-ingest",
    )
    assert grown.counts["written"] == first.counts["written"] + 1
    assert grown.manifest.inputs[0].digest != first.manifest.inputs[0].digest


def test_image_ids_do_not_depend_on_the_source_prefix(stack, tmp_path, s3_bucket):
    """The same files under another prefix (another folder, an S3 bucket) get the same ids and
    therefore the same val split."""
    import s3fs

    src = _class_folders(tmp_path / "here", "ab", 10)
    s3fs.S3FileSystem().put(str(src) + "/", f"{s3_bucket}/there/", recursive=True)
    results = [
        ingest.run(
            ingest.IngestConfig(
                source_uri=uri, output_uri=str(tmp_path / name), resolution=8, val_fraction=0.3
            ),
            "test-ingest",
        )
        for name, uri in (("a", str(src)), ("b", f"{s3_bucket}/there"))
    ]
    a, b = (stage.read_committed_table(r.output_uri).sort_by("image_id") for r in results)
    assert a["image_id"].to_pylist() == b["image_id"].to_pylist()
    assert a["split"].to_pylist() == b["split"].to_pylist() and "val" in a["split"].to_pylist()
    assert results[1].manifest.extra["source_root"] == f"{s3_bucket}/there"


def test_user_mistakes_end_in_one_line(tmp_path):
    """A source that does not exist: one line that names it and what to do, exit 1, no traceback
    (it goes to the log file, and --debug prints it)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TAMING_LOCAL_DIR": str(tmp_path / "local")}
    args = [
        sys.executable,
        "-m",
        "stages.ingest",
        f"source_uri={tmp_path / 'nope'}",
        f"output_uri={tmp_path / 'o'}",
    ]
    out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: source ") and "nope" in last and "ingest.source_uri" in last, last
    assert "Traceback" not in out.stderr
    log_file = Path(last.split("traceback in ", 1)[1].split(";", 1)[0])
    assert "Traceback" in log_file.read_text() and "FileNotFoundError" in log_file.read_text()
    debug = subprocess.run([*args, "--debug"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    assert not (tmp_path / "o").exists()  # nothing was written


def test_two_concurrent_runs_of_different_configs(stack, tmp_path):
    """Two drivers ingest different configs into one output URI at the same time: one commits, the
    other ends with the conflict error (one line), and the manifest is the winner's, whole."""
    import ray

    src = _class_folders(tmp_path / "src", "ab", 12)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "stages.ingest",
                f"source_uri={src}",
                f"output_uri={out}",
                f"resolution={r}",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (8, 16)
    ]
    results = [(p.wait(timeout=300), p.communicate()[1]) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], [err[-2000:] for _, err in results]
    loser = next(err for code, err in results if code == 1)
    assert "already holds the committed output" in loser.strip().splitlines()[-1]
    winner = 8 if results[0][0] == 0 else 16
    m = stage.read_manifest(str(out))
    assert m.config["resolution"] == winner and m.counts["written"] == 24
    t = stage.read_committed_table(str(out), verify=True)
    assert png_to_array(schemas.image_bytes(t["image"])[0]).shape[:2] == (winner, winner)
