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


def start_driver(
    module: str, config: Path, env: dict[str, str] | None = None, *, stderr: int = subprocess.PIPE
) -> subprocess.Popen:
    """``python -m <module> --config <config>`` as its own driver on the session's Ray cluster, in
    its own process group, its output as text (``stderr=subprocess.STDOUT``: one stream)."""
    import ray

    full = {
        **os.environ,
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
        "PYTHONPATH": str(ROOT),
        **(env or {}),
    }
    return subprocess.Popen(
        [sys.executable, "-m", module, "--config", str(config)],
        cwd=ROOT,
        env=full,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        errors="replace",
        start_new_session=True,
    )


def kill_stage_when(
    module: str, config: Path, watch: Path, pattern: str, timeout: float = 300, count: int = 1
) -> None:
    """``python -m <module> --config <config>``, killed when ``watch.glob(pattern)`` finds ``count``
    files."""
    proc = start_driver(module, config, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list(watch.glob(pattern))) >= count:
            break
        time.sleep(0.02)
    if proc.poll() is not None:
        log = proc.communicate()[0]
        raise AssertionError(
            f"{module} ended (status {proc.returncode}) before {pattern} appeared:\n{log[-3000:]}"
        )
    os.killpg(proc.pid, signal.SIGKILL)  # the driver dies mid-run, like a crashed job
    log = proc.communicate()[0]
    assert proc.returncode == -signal.SIGKILL, log[-3000:]
    assert not (watch / "_SUCCESS.json").exists(), "the run finished before it could be killed"
    time.sleep(1.0)  # let Ray reap the dead job's workers
