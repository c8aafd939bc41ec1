"""The promises a team relies on when it lets the pipeline write its datasets and models, tried
adversarially at toy size through the real services (Ray, the MLflow server, S3): a committed
output never changes, no secret is written anywhere, no unverified byte is consumed, and each
error is one line with the right exit status."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
import ray
import yaml

from infra import config as C
from infra import stage, storage
from infra.stage import InputError
from stages import sample, tokenize_images, train_gpt
from tests import images
from tests.codes import tokenizer_file, write_code_shards
from tests.generators import generator_file
from tests.killing import kill_stage_when, start_driver

ROOT = Path(__file__).resolve().parents[2]
EXP = "test-reliability"
SECRET = "sentinel-secret-8c1f"  # an AWS secret and an MLflow password nothing may write down


def _yaml(path: Path, section: str, cfg) -> Path:
    path.write_text(yaml.safe_dump({"run": {"experiment": EXP}, section: C.to_dict(cfg)}))
    return path


@pytest.fixture(scope="module")
def codes(stack, tmp_path_factory):
    root = tmp_path_factory.mktemp("rel")
    tok = tokenizer_file(root, 16)
    m = write_code_shards(
        str(root / "codes"), n_train=64, n_val=8, k=16, grid=(8, 8), classes=2,
        tokenizer_uri=tok[0], tokenizer_sha256=tok[1], shards=3,
    )  # fmt: skip
    return {"root": root, "codes": m.output_uri, "tokenizer": tok}


def _gpt_cfg(codes, out: str, **kw) -> train_gpt.TrainGPTConfig:
    base = dict(
        codes_uri=codes["codes"], output_uri=out, n_layer=1, n_head=2, n_embd=16, steps=4, batch_size=8,
        checkpoint_every=2, log_every=2, val_every=0, sample_every=0,
        resources={"workers": 1, "cpus_per_worker": 0.5},
    )  # fmt: skip
    return C.from_dict(train_gpt.TrainGPTConfig, {**base, **kw})


def test_twin_training_runs_commit_and_register_once(codes, tmp_path, mlflow_client):
    """Two identical train_gpt runs into one output, started together: both end well, the
    committed model is the manifest's (sha256), one version is registered and the alias names it;
    the run that lost says so and wrote and registered nothing."""
    cfg = _gpt_cfg(codes, str(tmp_path / "gpt"), register_name="twin-gpt")
    path = _yaml(tmp_path / "cfg.yaml", "train_gpt", cfg)
    runs = [start_driver("stages.train_gpt", path) for _ in range(2)]
    results = [(p.wait(timeout=600), *p.communicate()) for p in runs]
    assert [code for code, _, _ in results] == [0, 0], [err.splitlines()[-8:] for c, _, err in results if c]
    m = stage.read_manifest(str(tmp_path / "gpt"))
    assert storage.sha256(storage.read_bytes(m.data_uris()[0])) == m.files[0].sha256
    versions = mlflow_client.search_model_versions("name='twin-gpt'")
    assert [int(v.version) for v in versions] == [m.registered["version"]]
    assert (
        int(mlflow_client.get_model_version_by_alias("twin-gpt", "candidate").version)
        == m.registered["version"]
    )
    reused = "train_gpt reused (committed earlier"  # how the command ends when it did nothing
    cached = [out for _, out, _ in results if reused in out]
    assert len(cached) == 1, [out for _, out, _ in results]
    loser_log = next(err for _, out, err in results if reused in out)
    assert "was committed by another run of this config" in loser_log
    assert "committed " + m.output_uri not in loser_log
    assert not (tmp_path / "gpt" / stage.ATTEMPTS_DIR).exists()


def test_a_run_that_loses_to_another_identity_stops_early_and_cleans_up(codes, tmp_path):
    """sample, many shards, one at a time; another config commits the output meanwhile: the run
    stops at its next shard with the one-line conflict error, and its attempt folder is gone."""
    gen, _ = generator_file(tmp_path / "gen.safetensors", codes["tokenizer"])
    out = tmp_path / "samples"
    cfg = C.from_dict(
        sample.SampleConfig,
        {
            "model_uri": gen,
            "output_uri": str(out),
            "num_samples": 40,
            "samples_per_shard": 2,
            "batch_size": 1,
        },
    )
    proc = start_driver("stages.sample", _yaml(tmp_path / "cfg.yaml", "sample", cfg))
    deadline = time.monotonic() + 300
    while not list(out.glob(".attempts/*/_shards/part-*.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    other = stage.StageOutput(str(out), "sample", "another-identity")
    marker = other.write_shard(0, pa.table({"x": [1]}), {})
    assert other.commit(config={}, config_hash="x", inputs=[], markers=[marker], counts={})[1]
    code = proc.wait(timeout=300)
    err = proc.communicate()[1]
    assert code == 1 and "Traceback" not in err, err[-3000:]
    # the driver's own last line (Ray may relay a worker's log line after it)
    ours = [line for line in err.strip().splitlines() if not line.startswith("\x1b[36m(")]
    assert "already holds the committed output" in ours[-1]
    assert stage.read_manifest(str(out)).identity == "another-identity"  # the winner's, untouched
    assert not list(out.glob(".attempts/*"))  # the loser's attempt: cleaned up
    # a new run of the losing config now fails before any work
    with pytest.raises(stage.OutputConflictError):
        sample.run(cfg, EXP)


def test_inputs_are_verified_before_they_are_used(codes, stack, tmp_path):
    """A code shard with flipped bytes: train_gpt refuses before training, naming the file and
    both digests. An image shard replaced by another: tokenize refuses before any work."""
    copy = tmp_path / "codes"
    shutil.copytree(codes["codes"], copy)
    m = stage.read_manifest(str(copy))
    victim = next(f for f in m.files if f.split == "train")
    path = copy / victim.path
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 200):
        data[i] ^= 0x5A  # the same size: only the digest can tell
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match=f"{path} has sha256 [0-9a-f]{{64}}, its manifest {victim.sha256}"):
        train_gpt.run(_gpt_cfg(codes, str(tmp_path / "gpt"), codes_uri=str(copy)), EXP)
    assert not (tmp_path / "gpt").exists()
    # image shards: one file replaced by a copy of another (a swapped shard)
    res = images.ingested_noise(
        tmp_path / "ing", 24, 16, "L", EXP, resolution=16, channels=1, rows_per_shard=8
    )
    files = [tmp_path / "ing" / "images" / f.path for f in res.manifest.files]
    shutil.copyfile(files[0], files[1])
    tok = tokenizer_file(tmp_path, 16)
    with pytest.raises(InputError, match=str(files[1])):
        tokenize_images.run(
            tokenize_images.TokenizeConfig(
                images_uri=res.output_uri, tokenizer_uri=tok[0], output_uri=str(tmp_path / "c")
            ),
            EXP,
        )
    assert not (tmp_path / "c").exists()


def test_a_resume_redoes_shards_whose_files_changed_and_fails_the_killed_run(codes, tmp_path, mlflow_client):
    """sample killed after some shards; one finished shard's file truncated, another's deleted: the
    rerun does those two again (the other finished ones are reused), every committed file verifies,
    and the killed run's MLflow run, left RUNNING, is marked failed."""
    gen, _ = generator_file(tmp_path / "gen.safetensors", codes["tokenizer"])
    out = tmp_path / "samples"
    fields = {
        "model_uri": gen,
        "output_uri": str(out),
        "num_samples": 12,
        "samples_per_shard": 2,
        "batch_size": 1,
    }
    cfg = C.from_dict(sample.SampleConfig, fields)
    kill_stage_when("stages.sample", _yaml(tmp_path / "cfg.yaml", "sample", cfg), out,
                    ".attempts/*/_shards/part-*.json", count=3)  # fmt: skip
    finished = sorted(out.glob(".attempts/*/data/*.parquet"))
    assert len(finished) >= 3
    finished[0].write_bytes(finished[0].read_bytes()[:100])
    finished[1].unlink()
    killed_run = storage.read_json(str(next(out.glob(".attempts/*/_mlflow_run.json"))))["run_id"]
    assert mlflow_client.get_run(killed_run).info.status == "RUNNING"
    markers = len(list(out.glob(".attempts/*/_shards/part-*.json")))
    res = sample.run(cfg, EXP)
    assert res.counts["reused_shards"] == markers - 2 and res.counts["samples"] == 12
    t = stage.read_committed_table(res.output_uri, ["sample_index"])  # every file verified
    assert sorted(t["sample_index"].to_pylist()) == list(range(12))
    assert mlflow_client.get_run(killed_run).info.status == "FAILED"


def test_no_secret_is_written(codes, s3_bucket, stack, tmp_path):
    """A stage run as its own driver with an AWS secret and an MLflow password in its environment,
    writing to S3: neither appears in Ray's session logs, our logs, the MLflow database and
    artifacts, or the output."""
    gen, _ = generator_file(tmp_path / "gen.safetensors", codes["tokenizer"])
    cfg = C.from_dict(
        sample.SampleConfig,
        {"model_uri": gen, "output_uri": f"{s3_bucket}/samples", "num_samples": 4, "samples_per_shard": 2},
    )
    local = tmp_path / "local"
    mlflow_uri = stack["mlflow"].uri.replace("http://", f"http://alice:{SECRET}@")
    env = {"AWS_SECRET_ACCESS_KEY": SECRET, "MLFLOW_TRACKING_URI": mlflow_uri, "TAMING_LOCAL_DIR": str(local)}
    proc = start_driver("stages.sample", _yaml(tmp_path / "cfg.yaml", "sample", cfg), env)
    code, (out, err) = proc.wait(timeout=600), proc.communicate()
    assert code == 0, err[-3000:]
    assert SECRET not in out + err
    session_logs = Path(ray.get_runtime_context().get_temp_dir()) / "session_latest" / "logs"
    places = [session_logs, local, stack["mlflow"].root]
    leaks = [str(p) for root in places for p in Path(root).rglob("*") if p.is_file() and _holds(p)]
    assert leaks == []
    written = storage.list_files(f"{s3_bucket}/samples")
    assert written and all(SECRET.encode() not in storage.read_bytes(u) for u in written)
    with sqlite3.connect(stack["mlflow"].root / "mlflow-server.db") as db:  # also the server's tables
        for (table,) in db.execute("select name from sqlite_master where type='table'"):
            rows = db.execute(f"select * from {table}").fetchall()  # noqa: S608 - our own test database
            assert SECRET not in repr(rows), table


def _holds(path: Path) -> bool:
    try:
        return SECRET.encode() in path.read_bytes()
    except OSError:
        return False


def test_two_first_runs_create_one_mlflow_database(tmp_path):
    """Two processes open a new embedded MLflow database at once: both work (its creation is one
    at a time), no "duplicate column" crash."""
    code = "from infra import tracking; tracking.set_experiment('first'); print('ok')"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TAMING_LOCAL_DIR": str(tmp_path / "local")}
    env.pop("MLFLOW_TRACKING_URI", None)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(2)
    ]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    assert [(c, o.strip()) for c, o, _ in results] == [(0, "ok"), (0, "ok")], [e[-2000:] for *_, e in results]
