"""The whole chain as one Ray job on a real two-node cluster (a head and a second node, separate
`ray start` processes on loopback, 3 CPUs each), S3 (moto's server) for every output, the session's
MLflow server for runs and the registry. pipelines/configs/smoke.yaml, with 2 CPUs per task, actor
or training worker, so that no node holds two: the work has to spread.

While train_gpt trains, the second node dies (SIGKILL of its raylet and workers) and a replacement
joins, as a cluster manager would bring one: Ray Train restarts the worker group there and resumes
from the checkpoint. Once sampling has written a shard, the job's driver is SIGKILLed; the same job
submitted again reuses every committed stage and resumes sampling, without duplicate rows.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from infra import image_shards, services, stage
from tests import images

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")
OUTPUTS = {
    "ingest": "images",
    "train_vqgan": "vqgan",
    "tokenize_images": "codes",
    "train_gpt": "gpt",
    "sample": "samples",
    "evaluate": "evaluation",
}
# The head's health checks notice a dead node within ~3 s (Ray's default: ~15-30 s)
FAST_NODE_DEATH = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}
# 2 of a node's 3 CPUs per task, actor or training worker: no node holds two, and 1 CPU stays free
# on each for Ray Data's read tasks
SPREAD = [f"{s}.resources.cpus_per_worker=2" for s in OUTPUTS]
DISTRIBUTED = ("ingest", "train_vqgan", "tokenize_images", "train_gpt", "sample")


def _git_status() -> list[str]:
    out = subprocess.run(
        ["git", "status", "--porcelain", "--ignored", "--untracked-files=all"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout
    return [line for line in out.splitlines() if "__pycache__" not in line and ".pytest_cache" not in line]


def _fs():
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)


def _wait(cond, what: str, timeout: float, job: tuple | None = None) -> None:
    deadline = time.monotonic() + timeout
    ended = None
    while time.monotonic() < deadline and ended is None:
        if cond():
            return
        if job is not None and _status(*job) in ("FAILED", "SUCCEEDED", "STOPPED"):
            ended = _status(*job)
        time.sleep(0.3)
    logs = _logs(*job) if job is not None else ""
    raise AssertionError(f"{f'job {ended}' if ended else 'timed out'} before {what}:\n{logs[-6000:]}")


def _client(head: services.RayHead):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(head.dashboard)


def _status(head, job_id: str) -> str:
    return str(_client(head).get_job_status(job_id).value)


def _logs(head, job_id: str) -> str:
    return _client(head).get_job_logs(job_id)


def _submit(head, job_id: str, args: list[str]) -> None:
    cmd = [RAY, "job", "submit", "--no-wait", "--submission-id", job_id, "--working-dir", str(ROOT), "--"]
    cmd += ["python", "pipelines/full.py", "--config", "pipelines/configs/smoke.yaml", *args]
    out = subprocess.run(cmd, env={**os.environ, **head.env()}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def _nodes(head) -> dict[str, bool]:
    """Alive node id -> is the head."""
    from ray.util.state import list_nodes

    return {n.node_id: n.is_head_node for n in list_nodes(address=head.dashboard) if n.state == "ALIVE"}


def _marker_nodes(fs, attempts: str) -> set[str]:
    if not fs.exists(attempts):
        return set()
    found = [p for p in fs.find(attempts) if "/_shards/" in p and p.endswith(".json")]
    return {json.loads(fs.cat(p)).get("node", "") for p in found}


def test_whole_chain_on_two_nodes_survives_driver_and_node_loss(stack, s3_bucket, tmp_path, mlflow_client):
    fs = _fs()
    for c in "ab":  # the source images, in S3 too
        for i in range(24):  # enough rows that a training epoch holds every step (an epoch costs ~6 s)
            data = images.encode(images.noise(20, 20, "RGB", 100 * ord(c) + i), "PNG")
            fs.pipe(f"{s3_bucket}/src/{c}/{i}.png".removeprefix("s3://"), data)
    root = f"{s3_bucket}/run"
    node_local = tmp_path / "node-local"  # TAMING_LOCAL_DIR of both nodes: logs and caches only
    env = {
        **stack["s3"].env(),
        **stack["mlflow"].env(),
        "TAMING_LOCAL_DIR": str(node_local),
        **FAST_NODE_DEATH,
    }
    git_before = _git_status()
    args = [
        f"ingest.source_uri={s3_bucket}/src",
        f"run.root_uri={root}",
        "run.experiment=test-cluster",
        "train_vqgan.register_name=cluster-vqgan",
        "train_gpt.register_name=cluster-gpt",
        "ingest.rows_per_shard=8",
        "train_gpt.steps=12",  # long enough to be killed between its checkpoints
        "train_gpt.checkpoint_every=2",
        "sample.samples_per_class=32",  # 16 shards of 4: the driver dies with work left
        *SPREAD,
    ]
    head = services.RayHead(tmp_path / "head", num_cpus=3).start(env=env)
    workers = [services.RayWorkerNode(tmp_path / "w1", head, num_cpus=3).start(env=env)]
    try:
        assert len(_nodes(head)) == 2
        _submit(head, "first", args)
        # 1. the second node dies while train_gpt trains (after a checkpoint); a replacement joins
        gpt_attempts = f"{root}/gpt/.attempts".removeprefix("s3://")
        _wait(
            lambda: any(
                "checkpoint_" in p for p in (fs.find(gpt_attempts) if fs.exists(gpt_attempts) else [])
            ),
            "a train_gpt checkpoint",
            420,
            (head, "first"),
        )
        workers[0].kill()
        assert not stage.is_committed(f"{root}/gpt"), "training finished before the node died"
        workers.append(services.RayWorkerNode(tmp_path / "w2", head, num_cpus=3).start(env=env))
        # 2. the job's driver dies once sampling has written a shard
        sample_attempts = f"{root}/samples/.attempts".removeprefix("s3://")
        _wait(lambda: _marker_nodes(fs, sample_attempts), "a sample shard", 420, (head, "first"))
        os.kill(int(_client(head).get_job_info("first").driver_info.pid), signal.SIGKILL)
        assert not stage.is_committed(f"{root}/samples"), "sampling finished before the driver died"
        _wait(lambda: _status(head, "first") in ("FAILED", "STOPPED"), "the killed job to end", 60)
        # 3. the same job again: what was committed is reused, sampling resumes
        _submit(head, "second", args)
        _wait(lambda: _status(head, "second") in ("FAILED", "SUCCEEDED", "STOPPED"), "the job to end", 420)
        logs = _logs(head, "second")
        (tmp_path / "second.log").write_text(logs)  # kept for a look after a failure
        first_logs = _logs(head, "first")
        (tmp_path / "first.log").write_text(first_logs)
        assert _status(head, "second") == "SUCCEEDED", logs[-6000:]
    finally:
        for w in workers:
            w.stop()
        head.stop()

    # the job's console tells the story (the training progress lines of every worker's rank 0) and
    # not Ray's per-report and per-dataset chatter (kept in Ray's log files)
    for line in ("train_vqgan: step", "train_gpt: step", "== train_gpt ->"):
        assert line in first_logs, line
    chatter_lines = (
        "Reporting training result",  # Ray Train, per report
        "Starting execution of Dataset",  # Ray Data, per dataset
        "Execution plan of",
        "Found multiple active Ray instances",  # a worker-side Ray helper without RAY_ADDRESS
        "View run",  # MLflow, per run end
        "Downloading artifacts",  # MLflow, per transfer
    )
    for chatter in chatter_lines:
        assert chatter not in first_logs + logs, chatter
    manifests = {s: stage.read_manifest(f"{root}/{o}") for s, o in OUTPUTS.items()}  # every output in S3
    for s in DISTRIBUTED:  # each distributed stage's tasks, actors or training workers ran on both nodes
        assert len(manifests[s].nodes) >= 2, (s, manifests[s].nodes)
    # finished stages were not redone: one MLflow run each, the one their manifest names
    exp = mlflow_client.get_experiment_by_name("test-cluster")
    for s in ("ingest", "train_vqgan", "tokenize_images", "train_gpt"):
        runs = mlflow_client.search_runs([exp.experiment_id], filter_string=f"tags.stage = '{s}'")
        assert [r.info.run_id for r in runs] == [manifests[s].mlflow_run_id]
    # training lost a worker with the node, restarted its group on the replacement, resumed from the
    # checkpoint and logged every step once
    gpt_run_id = manifests["train_gpt"].mlflow_run_id
    resumed = mlflow_client.get_metric_history(gpt_run_id, "train/resumed_from_step")
    assert resumed and all(x.value >= 2 and x.value % 2 == 0 for x in resumed)
    assert {x.step for x in mlflow_client.get_metric_history(gpt_run_id, "train/loss")} == set(
        range(2, 13, 2)
    )
    assert manifests["train_gpt"].counts["steps"] == 12
    assert mlflow_client.get_run(gpt_run_id).info.status == "FINISHED"
    # sampling resumed from the killed job's shards: every sample once, no duplicates
    assert manifests["sample"].counts["reused_shards"] >= 1
    table = stage.read_committed_table(f"{root}/samples", ["image_id", "sample_index"])
    assert table.num_rows == 64 and len(set(table["image_id"].to_pylist())) == 64
    assert sorted(table["sample_index"].to_pylist()) == list(range(64))
    # the lineage: each output names the one it was made from
    inputs = {s: {i.name: i for i in m.inputs} for s, m in manifests.items()}
    assert inputs["tokenize_images"]["images"].uri == f"{root}/images"
    assert inputs["train_gpt"]["codes"].digest == manifests["tokenize_images"].identity
    assert inputs["sample"]["generator"].uri == f"{root}/gpt"
    assert image_shards.describe(manifests["sample"]).generation.training_run_id == gpt_run_id
    assert (inputs["evaluate"]["generated"].uri, inputs["evaluate"]["reference"].uri) == (
        f"{root}/samples",
        f"{root}/images",
    )
    # the registry holds both models
    for name in ("cluster-vqgan", "cluster-gpt"):
        assert mlflow_client.get_model_version_by_alias(name, "candidate").version
    # the end-of-run table
    assert re.search(r"^train_gpt +cached ", logs, re.M), logs[-3000:]
    assert re.search(r"^sample +ran \(\d+ shards reused\)", logs, re.M), logs[-3000:]
    # nothing written to a node's disk but logs and caches; nothing in the checkout
    assert _git_status() == git_before
    if node_local.exists():
        assert {p.name for p in node_local.iterdir()} <= {"logs", "model-cache"}
        stray = [
            p for p in node_local.rglob("*") if p.suffix in (".parquet", ".db") or p.name == "_SUCCESS.json"
        ]
        assert stray == []
