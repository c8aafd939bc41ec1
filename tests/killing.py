"""Crash a stage for real: run it as its own driver on the session's Ray cluster and SIGKILL the whole
process group once a file matching a pattern appears (a shard marker, a checkpoint)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def kill_stage_when(module: str, config: Path, watch: Path, pattern: str, timeout: float = 300) -> None:
    """``python -m <module> --config <config>``, killed when ``watch.glob(pattern)`` finds a file."""
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", module, "--config", str(config)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if any(watch.glob(pattern)):
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver dies mid-run, like a crashed job
    log = proc.communicate()[0].decode(errors="replace")
    assert proc.returncode == -signal.SIGKILL, log[-3000:]
    assert not (watch / "_SUCCESS.json").exists(), "the run finished before it could be killed"
    time.sleep(1.0)  # let Ray reap the dead job's workers


def kill_train_worker_when(watch: Path, pattern: str, count: int = 1, timeout: float = 300) -> int:
    """SIGKILL one live Ray Train worker process once ``watch.glob(pattern)`` finds ``count`` files
    (checkpoints); returns its pid. The driver lives on, and Ray Train must replace the worker."""
    import ray
    from ray.util.state import list_actors

    gcs = ray.get_runtime_context().gcs_address  # this session's cluster, whatever else runs here
    deadline = time.monotonic() + timeout
    while len(list(watch.glob(pattern))) < count:
        assert time.monotonic() < deadline, f"nothing matched {pattern} under {watch}"
        time.sleep(0.05)
    while True:
        workers = [
            a
            for a in list_actors(address=gcs, filters=[("state", "=", "ALIVE")], detail=True)
            if "RayTrainWorker" in a.class_name and a.pid
        ]
        if workers:
            break
        assert time.monotonic() < deadline, "no live Ray Train worker to kill"
        time.sleep(0.05)
    pid = max(workers, key=lambda a: a.pid).pid
    os.kill(pid, signal.SIGKILL)
    return pid
