"""Local services on 127.0.0.1 for tests and interactive use: an MLflow tracking server with a
sqlite backend (so the model registry works), an S3 server (moto's server mode, as s3fs's own tests
use) and a Ray head.

    python -m infra.services up   [--root .local]   # start all three, write .local/env.sh
    python -m infra.services down [--root .local]   # stop them
    python -m infra.services status

``source .local/env.sh`` then points MLflow, s3fs/boto3 and Ray clients at them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    """A console script of this environment (the venv's), falling back to PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def _venv_path() -> str:
    """PATH with this environment first: a job's `python` is whatever a node's PATH finds first."""
    return f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def _wait_http(url: str, timeout: float, proc: subprocess.Popen | None, log_path: Path | None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log_path.read_text()[-3000:] if log_path and log_path.exists() else ""
            raise RuntimeError(f"service for {url} exited with code {proc.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s (log: {log_path})")


@dataclass
class Service:
    """A child process in its own process group, with its log in ``root``."""

    name: str
    root: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def log_path(self) -> Path:
        return self.root / f"{self.name}.log"

    def _spawn(self, cmd: list[str], env: dict[str, str] | None = None) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
            cwd=self.root,
        )

    def _await(self, url: str, timeout: float) -> None:
        """Wait for ``url`` to answer; a service that never gets ready is stopped, not leaked."""
        try:
            _wait_http(url, timeout, self.proc, self.log_path)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 15) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        stop_group(self.proc.pid, timeout, self.proc)


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group still runs (zombies left to init do not count)."""
    proc_dir = Path("/proc")
    if not proc_dir.exists():  # not Linux: ask the kernel, zombies included
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
    for stat in proc_dir.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
            return True
    return False


def stop_group(pid: int, timeout: float = 15, proc: subprocess.Popen | None = None) -> None:
    """SIGTERM a process group, then SIGKILL what is left after ``timeout``.

    ``proc`` (the group leader, when it is our child) is reaped while waiting: an unreaped zombie
    would keep the group looking alive.
    """
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None:
            proc.poll()
        if not _group_alive(pid):
            return
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if proc is not None:
        proc.wait(timeout=5)


class S3Server(Service):
    """moto in server mode: an in-memory S3 on 127.0.0.1."""

    def __init__(self, root: Path, port: int | None = None):
        super().__init__("s3", root, port or free_port())

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, **S3_ENV}

    def start(self, timeout: float = 60) -> S3Server:
        self._spawn([_bin("moto_server"), "-H", "127.0.0.1", "-p", str(self.port)])
        self._await(f"{self.endpoint}/moto-api/", timeout)
        return self


class MlflowServer(Service):
    """``mlflow server`` with a sqlite backend store and local artifact storage."""

    def __init__(self, root: Path, port: int | None = None):
        super().__init__("mlflow", root, port or free_port())

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_URI": self.uri}

    def start(self, timeout: float = 180, wait: bool = True) -> MlflowServer:
        """Start the server; with ``wait=False`` call :meth:`wait` later (it takes 10-40 s)."""
        self.root.mkdir(parents=True, exist_ok=True)
        cmd = [
            _bin("mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{self.root / 'mlflow-server.db'}",
            "--artifacts-destination",
            str(self.root / "mlflow-artifacts"),
        ]
        self._spawn(cmd, env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        return self.wait(timeout) if wait else self

    def wait(self, timeout: float = 180) -> MlflowServer:
        self._await(f"{self.uri}/health", timeout)
        return self


class RayHead(Service):
    """``ray start --head --block`` with its own temp dir; stopped by signalling its group."""

    def __init__(self, root: Path, port: int | None = None, num_cpus: int | None = None):
        super().__init__("ray", root, port or free_port())
        self.num_cpus = num_cpus or max(4, os.cpu_count() or 1)
        self.dashboard_port = free_port()
        self.agent_port = free_port()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def env(self) -> dict[str, str]:
        return {
            "RAY_ADDRESS": self.address,
            "RAY_API_SERVER_ADDRESS": self.dashboard,
            "RAY_AUTH_MODE": "disabled",
        }

    def start(self, timeout: float = 120, env: dict[str, str] | None = None) -> RayHead:
        temp_dir = Path("/tmp") / f"ray-taming-{self.port}"  # short: Ray's socket paths are limited
        cmd = [
            _bin("ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--num-cpus",
            str(self.num_cpus),
            "--temp-dir",
            str(temp_dir),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(self.dashboard_port),
            "--dashboard-agent-listen-port",
            str(self.agent_port),
            "--disable-usage-stats",
        ]
        self._spawn(
            cmd,
            env={
                "RAY_AUTH_MODE": "disabled",
                "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
                "PATH": _venv_path(),
                **(env or {}),
            },
        )
        self._await(f"{self.dashboard}/api/version", timeout)
        # Jobs are submitted through the head's dashboard agent, which comes up after the dashboard
        # (a submit before that fails with "No available agent"): wait for it too.
        self._await(f"http://127.0.0.1:{self.agent_port}/api/local_raylet_healthz", timeout)
        return self


class RayWorkerNode(Service):
    """``ray start --address <head> --block``: a second node of a head's cluster on this machine
    (its own raylet, object store, ports and temp dir), with ``num_cpus`` of its own. Killing its
    process group is the node dying.

    The temp dir must be its own: a node started without ``--temp-dir`` takes the head's, and on
    one machine the two nodes' runtime-env agents then share one ``runtime_resources`` folder, where
    the second node deletes the job's unpacked working dir (the driver's cwd) once its own tasks no
    longer need it (measured: the driver failed in the next stage on ``os.getcwd()``)."""

    def __init__(self, root: Path, head: RayHead, num_cpus: int = 2, name: str = "ray-worker"):
        super().__init__(name, root)
        self.head, self.num_cpus = head, num_cpus
        self.agent_port = free_port()

    def start(self, timeout: float = 120, env: dict[str, str] | None = None) -> RayWorkerNode:
        cmd = [
            _bin("ray"),
            "start",
            "--address",
            self.head.address,
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--num-cpus",
            str(self.num_cpus),
            "--dashboard-agent-listen-port",
            str(self.agent_port),
            "--temp-dir",
            f"/tmp/ray-taming-n{self.agent_port}",  # short: Ray's socket paths are limited
            "--disable-usage-stats",
        ]
        self._spawn(cmd, env={"RAY_AUTH_MODE": "disabled", "PATH": _venv_path(), **(env or {})})
        self._await(f"http://127.0.0.1:{self.agent_port}/api/local_raylet_healthz", timeout)
        return self

    def kill(self) -> None:
        """The node dies: SIGKILL to every process of it (raylet, workers, agents), no draining."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)


# --------------------------------------------------------------------------- make up / make down


def _state_file(root: Path) -> Path:
    return root / "services.json"


def up(root: Path) -> dict[str, str]:
    root = root.resolve()
    if _state_file(root).exists():
        state = json.loads(_state_file(root).read_text())
        if all(_alive(p) for p in state["pids"].values()):
            print(f"services already running (see {root / 'env.sh'})")
            return state["env"]
        down(root)
    svc_root = root / "services"
    s3 = S3Server(svc_root).start()
    print(f"S3 (moto)  {s3.endpoint}")
    mlflow = MlflowServer(svc_root).start()
    print(f"MLflow     {mlflow.uri}")
    env = {**s3.env(), **mlflow.env(), "TAMING_LOCAL_DIR": str(root)}
    ray = RayHead(svc_root).start(env=env)  # workers inherit MLflow/S3 settings from the head
    print(f"Ray        {ray.address} (dashboard {ray.dashboard})")
    env.update(ray.env())
    pids = {"s3": s3.proc.pid, "mlflow": mlflow.proc.pid, "ray": ray.proc.pid}
    _state_file(root).write_text(json.dumps({"pids": pids, "env": env}, indent=2))
    (root / "env.sh").write_text("".join(f"export {k}={v}\n" for k, v in env.items()))
    print(f"source {root / 'env.sh'} to use them; `make down` stops them")
    return env


def _alive(pid: int) -> bool:
    return _group_alive(pid)


def down(root: Path) -> None:
    root = root.resolve()
    if not _state_file(root).exists():
        print("no services recorded as running")
        return
    state = json.loads(_state_file(root).read_text())
    for name, pid in state["pids"].items():
        stop_group(pid)
        print(f"stopped {name}")
    _state_file(root).unlink()
    (root / "env.sh").unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--root", type=Path, default=Path(".local"), help="state folder (default .local)")
    a = p.parse_args(argv)
    if a.action == "up":
        up(a.root)
    elif a.action == "down":
        down(a.root)
    else:
        f = _state_file(a.root.resolve())
        if not f.exists():
            print("not running")
            return
        state = json.loads(f.read_text())
        for name, pid in state["pids"].items():
            print(f"{name:7s} pid {pid} {'running' if _alive(pid) else 'DEAD'}")
        print("".join(f"{k}={v}\n" for k, v in state["env"].items()), end="")


if __name__ == "__main__":
    main()
