"""The tokenize stage through the real local Ray, MLflow server (registry) and S3 server."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from infra import code_shards, devices, model_store, schemas, stage
from infra.imaging import pngs_to_array
from models import checkpoint
from models.vqgan import VQGAN
from stages import tokenize_images
from stages.tokenize_images import TokenizeConfig
from tests import images
from tests.killing import kill_stage_when
from tests.tiny import tiny_vqgan

ROOT = Path(__file__).resolve().parents[2]
TOK = tiny_vqgan(in_channels=3, out_channels=3, codebook_size=64)


@pytest.fixture(scope="module")
def image_shards(stack, tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    res = images.ingested_noise(
        root, 40, 20, "RGB", "test-tokenize", resolution=16, rows_per_shard=10, val_fraction=0.3
    )
    torch.manual_seed(0)
    model = VQGAN(TOK).eval()
    checkpoint.save_native(model, root / "tok.safetensors")
    return {
        "root": root,
        "images": res.output_uri,
        "model": model,
        "tokenizer": str(root / "tok.safetensors"),
    }


def test_codes_match_in_memory_model(image_shards, tmp_path):
    d = image_shards
    cfg = TokenizeConfig(
        images_uri=d["images"], tokenizer_uri=d["tokenizer"], output_uri=str(tmp_path / "codes"), hflip=True
    )
    res = tokenize_images.run(cfg, "test-tokenize")
    c, e = res.counts, code_shards.describe(res.manifest)
    n_files = len(stage.read_manifest(d["images"]).files)  # a code file per image file (per split)
    assert (c["images"], c["rows"], c["shards"], e.grid) == (40, 80, n_files, (8, 8))
    assert e.codebook_size == 64 and res.figures["bytes_per_code"] < 2.0  # 2-byte slots, zstd
    assert e.augmentations == ["identity", "hflip"] and e.image_size == (16, 16)
    t = stage.read_committed_table(res.output_uri, verify=True)
    imgs = stage.read_committed_table(d["images"]).sort_by("image_id")
    x = torch.from_numpy(pngs_to_array(schemas.image_bytes(imgs["image"]), 3))
    with torch.no_grad():
        _, _, expected = d["model"].encode(x)
        expected_flip = d["model"].encode(x.flip(-1))[2]
    ids = imgs["image_id"].to_pylist()
    for aug, want in ((0, expected), (1, expected_flip)):
        rows = t.filter(t["aug_id"].to_numpy() == aug).sort_by("image_id")
        assert rows["image_id"].to_pylist() == ids
        got = torch.from_numpy(schemas.decode_codes(rows["codes"], 64)).reshape(-1, 8, 8)
        assert torch.equal(got, want)
        # decoding the stored codes gives the in-memory model's reconstruction
        with torch.no_grad():
            torch.testing.assert_close(d["model"].decode_codes(got), d["model"].decode_codes(want))
    # the reader API: filtered torch batches
    batches = list(code_shards.iter_batches(res.output_uri, 16, split="train", labels=[1]))
    n = sum(len(b["image_id"]) for b in batches)
    assert n == int(((t["split"].to_numpy() == "train") & (t["label"].to_numpy() == 1)).sum()) and n > 0
    assert all(b["codes"].shape[1] == 64 and b["codes"].dtype == torch.int64 for b in batches)
    ds_rows = code_shards.ray_dataset(res.output_uri, split="val").take_all()
    assert len(ds_rows) == int((t["split"].to_numpy() == "val").sum()) and len(ds_rows[0]["codes"]) == 64
    assert tokenize_images.run(cfg, "test-tokenize").cached


def test_killed_run_resumes_byte_identical(image_shards, tmp_path):
    d = image_shards
    whole = tokenize_images.run(
        TokenizeConfig(images_uri=d["images"], tokenizer_uri=d["tokenizer"], output_uri=str(tmp_path / "a")),
        "test-tokenize",
    )

    cfg_path = tmp_path / "cfg.yaml"
    out_b = tmp_path / "b"
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "run": {"experiment": "test-tokenize"},
                "tokenize_images": {
                    "images_uri": d["images"],
                    "tokenizer_uri": d["tokenizer"],
                    "output_uri": str(out_b),
                    "batch_size": 2,
                },
            }
        )
    )
    kill_stage_when("stages.tokenize_images", cfg_path, out_b, ".attempts/*/_shards/part-*.json")
    res = tokenize_images.run(
        TokenizeConfig(images_uri=d["images"], tokenizer_uri=d["tokenizer"], output_uri=str(out_b)),
        "test-tokenize",
    )
    assert res.counts["reused_shards"] >= 1
    assert [f.sha256 for f in res.manifest.files] == [f.sha256 for f in whole.manifest.files]  # same bytes


def test_s3_and_registry_uri(image_shards, s3_bucket, stack):
    import s3fs

    d = image_shards
    fs = s3fs.S3FileSystem()
    fs.put(d["tokenizer"], f"{s3_bucket}/models/tok.safetensors")
    res = tokenize_images.run(
        TokenizeConfig(
            images_uri=d["images"],
            tokenizer_uri=f"{s3_bucket}/models/tok.safetensors",
            output_uri=f"{s3_bucket}/codes",
        ),
        "test-tokenize",
    )
    assert fs.exists(f"{s3_bucket}/codes/_SUCCESS.json") and res.counts["rows"] == 40
    # the registry: register the model, then tokenize from models:/name@alias
    mlflow.set_tracking_uri(stack["mlflow"].uri)
    mlflow.set_experiment("test-registry")
    with mlflow.start_run():
        registered = model_store.register(
            checkpoint.to_bytes(d["model"]), "test-tokenizer", alias="candidate", tags={"val/psnr": 1.0}
        )
    assert (
        registered["version"] >= 1 and registered["uri"] == f"models:/test-tokenizer/{registered['version']}"
    )
    loaded = model_store.load_first_stage("models:/test-tokenizer@candidate")
    assert loaded.sha256 == model_store.load_first_stage(d["tokenizer"]).sha256
    res2 = tokenize_images.run(
        TokenizeConfig(
            images_uri=d["images"],
            tokenizer_uri="models:/test-tokenizer@candidate",
            output_uri=f"{s3_bucket}/codes2",
        ),
        "test-tokenize",
    )
    a, b = (
        stage.read_committed_table(r.output_uri).sort_by([("image_id", "ascending"), ("aug_id", "ascending")])
        for r in (res, res2)
    )
    assert a["codes"].equals(b["codes"])  # same model, same codes (the files differ in their tokenizer URI)
    assert (
        code_shards.describe(res2.manifest).tokenizer_sha256
        == code_shards.describe(res.manifest).tokenizer_sha256
    )


def test_bad_tokenizer_and_channels_fail_before_work(image_shards, tmp_path):
    d = image_shards
    base = TokenizeConfig(
        images_uri=d["images"], tokenizer_uri=d["tokenizer"], output_uri=str(tmp_path / "x")
    )
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tokenize_images.run(dataclasses.replace(base, tokenizer_uri=str(tmp_path / "nope.safetensors")))
    with pytest.raises(FileNotFoundError, match="registry"):
        tokenize_images.run(dataclasses.replace(base, tokenizer_uri="models:/no-such-model@candidate"))
    gray = VQGAN(dataclasses.replace(TOK, in_channels=1, out_channels=1))
    checkpoint.save_native(gray, tmp_path / "gray.safetensors")
    with pytest.raises(stage.InputError, match="1-channel images but"):
        tokenize_images.run(dataclasses.replace(base, tokenizer_uri=str(tmp_path / "gray.safetensors")))
    assert not (tmp_path / "x").exists()  # nothing was written


def test_crops_are_deterministic(image_shards, tmp_path):
    d = image_shards
    cfg = TokenizeConfig(
        images_uri=d["images"],
        tokenizer_uri=d["tokenizer"],
        output_uri=str(tmp_path / "c"),
        num_crops=2,
        crop_size=8,
        hflip=True,
    )
    res = tokenize_images.run(cfg, "test-tokenize")
    described = code_shards.describe(res.manifest)
    assert res.counts["rows"] == 40 * 4 and described.grid == (4, 4) and described.crop_size == 8
    assert described.augmentations == ["identity", "hflip", "crop0", "crop1"]
    again = tokenize_images.run(dataclasses.replace(cfg, output_uri=str(tmp_path / "c2")), "test-tokenize")
    assert [f.sha256 for f in again.manifest.files] == [f.sha256 for f in res.manifest.files]
    with pytest.raises(stage.InputError, match="crop_size 16 must be below"):
        tokenize_images.run(dataclasses.replace(cfg, crop_size=16), "test-tokenize")


def test_auto_batch_size_is_a_pixel_budget():
    auto = devices.auto_batch_size
    assert auto(256, 256, "cpu") == 1 and auto(32, 32, "cpu") == 32  # CPU: small batches stay in cache
    assert auto(256, 256, "cuda") == 64 and auto(512, 512, "cuda") == 16
    assert auto(4096, 4096, "cpu") == 1 and auto(2, 2, "cuda") == 1024  # never 0, never unbounded


def test_unresolvable_model_uri_is_one_line(image_shards, tmp_path):
    """A registry URI that does not resolve: one line naming it and the registry, exit status 1."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT), "TAMING_LOCAL_DIR": str(tmp_path / "local")}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.tokenize_images",
            f"images_uri={image_shards['images']}",
            "tokenizer_uri=models:/no-such-model@candidate",
            f"output_uri={tmp_path / 'codes'}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot resolve models:/no-such-model@candidate in the MLflow registry"), (
        last
    )
    assert not (tmp_path / "codes").exists()
