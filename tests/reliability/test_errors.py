"""Every user-caused error is one line with the right exit status (2: the config, 1: the input),
never a traceback, and nothing is written: probes that need no Ray, MLflow or S3 server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from infra import config as C
from infra import stage
from stages import ingest, train_gpt, train_vqgan
from tests import codes, images

ROOT = Path(__file__).resolve().parents[2]


def _run(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "TAMING_LOCAL_DIR": str(tmp_path / "local"), **env}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=300
    )


def _one_line(out: subprocess.CompletedProcess, status: int, *words: str) -> str:
    assert out.returncode == status, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    for w in words:
        assert w in last, last
    return last


@pytest.mark.parametrize(
    ("cls", "fields", "message"),
    [
        (train_gpt.TrainGPTConfig, {"batch_size": 0}, "steps and batch_size must be >= 1"),
        (train_gpt.TrainGPTConfig, {"steps": -5}, "steps and batch_size must be >= 1"),
        (train_vqgan.TrainVQGANConfig, {"batch_size": 0}, "steps and batch_size must be >= 1"),
        (train_vqgan.TrainVQGANConfig, {"steps": -5}, "steps and batch_size must be >= 1"),
        (train_gpt.TrainGPTConfig, {"resources": {"workers": 0}}, "workers must be >= 1"),
    ],
)
def test_counts_that_cannot_work_are_config_errors(cls, fields, message):
    with pytest.raises(C.ConfigError, match=message):
        C.from_dict(cls, fields)


def test_an_empty_ingest_is_refused(tmp_path):
    images.write_tree(tmp_path / "src", {"a/0.png": images.encode(images.noise(12, 12), "PNG")})
    cfg = ingest.IngestConfig(source_uri=str(tmp_path / "src"), output_uri=str(tmp_path / "o"), max_images=0)
    with pytest.raises(C.ConfigError, match="max_images must be >= 1"):
        ingest.run(cfg)
    assert not (tmp_path / "o").exists()


def test_a_yaml_python_tag_is_a_config_error(tmp_path):
    (tmp_path / "pwned").unlink(missing_ok=True)
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f'ingest: !!python/object/apply:os.system ["touch {tmp_path / "pwned"}"]\n')
    out = _run(["-m", "stages.ingest", "--config", str(cfg)], tmp_path)
    assert out.returncode == 2 and "not plain YAML" in out.stderr and "Traceback" not in out.stderr, (
        out.stderr
    )
    assert not (tmp_path / "pwned").exists()  # nothing was constructed
    pipeline = _run(["pipelines/full.py", "--config", str(cfg)], tmp_path)
    assert pipeline.returncode == 2 and "not plain YAML" in pipeline.stderr


def test_a_truncated_parquet_source_is_one_line(tmp_path):
    (tmp_path / "src").mkdir()
    t = pa.table({"image": [images.encode(images.noise(12, 12), "PNG")] * 3, "label": [0, 1, 0]})
    pq.write_table(t, tmp_path / "src" / "part.parquet")
    data = (tmp_path / "src" / "part.parquet").read_bytes()
    (tmp_path / "src" / "part.parquet").write_bytes(data[: len(data) // 2])
    out = _run(
        ["-m", "stages.ingest", f"source_uri={tmp_path / 'src'}", f"output_uri={tmp_path / 'o'}"], tmp_path
    )
    _one_line(out, 1, "part.parquet", "not a readable Parquet file")
    assert not (tmp_path / "o").exists()


def test_a_truncated_manifest_is_one_line(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / stage.MANIFEST_NAME).write_text('{"stage": "ingest", "ident')
    args = ["-m", "stages.tokenize_images", f"images_uri={tmp_path / 'images'}"]
    out = _run([*args, "tokenizer_uri=/nowhere.safetensors", f"output_uri={tmp_path / 'codes'}"], tmp_path)
    _one_line(out, 1, "not a readable manifest", "rebuild it")
    assert not (tmp_path / "codes").exists()


def test_an_unreachable_s3_endpoint_is_one_line(tmp_path):
    out = _run(
        ["-m", "stages.ingest", "source_uri=s3://bucket/images", f"output_uri={tmp_path / 'o'}"],
        tmp_path,
        AWS_ENDPOINT_URL="http://127.0.0.1:9",
        AWS_ACCESS_KEY_ID="x",
        AWS_SECRET_ACCESS_KEY="y",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_MAX_ATTEMPTS="1",
    )
    _one_line(out, 1, "Could not connect to the endpoint URL")
    assert not (tmp_path / "o").exists()


def test_credentials_in_a_tracking_uri_are_never_printed(tmp_path):
    """A tracking URI with a password: the error line and the log file name the server without it."""
    out = _run(
        [
            "-m",
            "stages.sample",
            "model_uri=models:/nothing@here",
            f"output_uri={tmp_path / 'o'}",
            "num_samples=1",
        ],
        tmp_path,
        MLFLOW_TRACKING_URI="http://alice:s3cret-sentinel@127.0.0.1:9",
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
    )
    line = _one_line(out, 1, "http://***@127.0.0.1:9")
    assert "s3cret-sentinel" not in out.stderr + out.stdout, line
    logs = list((tmp_path / "local" / "logs").glob("*.log"))
    assert logs and all("s3cret-sentinel" not in p.read_text() for p in logs)


@pytest.mark.parametrize(
    ("batch_size", "workers"),
    [(9, 1), (2, 4)],  # more than the 8 training rows; fewer rows per batch than workers
)
def test_a_batch_that_does_not_fit_the_data_is_refused_in_the_plan(tmp_path, batch_size, workers):
    """train_gpt on 8 training rows: a batch above the rows, or below the workers, is an input
    error from the plan (before Ray starts), naming the rows and the batch."""
    tok_uri, tok_sha = codes.tokenizer_file(tmp_path, 16)
    codes.write_code_shards(
        str(tmp_path / "codes"), n_train=8, n_val=2, k=16, grid=(2, 2), classes=2,
        tokenizer_uri=tok_uri, tokenizer_sha256=tok_sha,
    )  # fmt: skip
    cfg = C.from_dict(
        train_gpt.TrainGPTConfig,
        {
            "codes_uri": str(tmp_path / "codes"),
            "output_uri": str(tmp_path / "gpt"),
            "batch_size": batch_size,
            "resources": {"workers": workers},
            "sample_every": 0,
        },
    )
    with pytest.raises(stage.InputError, match=f"8 training rows and train_gpt.batch_size={batch_size}"):
        train_gpt.plan(cfg)
