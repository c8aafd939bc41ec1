"""Shared, session-scoped real services: one local Ray, one MLflow server (sqlite backend) and one
S3 server (moto's server mode) on 127.0.0.1 for the whole test session, torn down at the end.

Two tiers: every test that uses these services (the ``stack`` fixture, directly or through another
fixture) is marked ``services``; the ones that take long without them are marked ``slow``.
``make test-fast`` runs the rest (``-m "not services and not slow"``), ``make test`` everything."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from infra import services

ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "stack" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.services)


STRAY = ("mlflow.db", "mlruns")  # MLflow's defaults in the working directory: nothing may write them


def _stray_state() -> dict[str, float]:
    return {n: (ROOT / n).stat().st_mtime for n in STRAY if (ROOT / n).exists()}


@pytest.fixture(scope="session", autouse=True)
def _nothing_written_to_the_repo_root():
    """No command under test writes MLflow's default store into the working directory."""
    before = _stray_state()
    yield
    after = _stray_state()
    assert after == before, f"something wrote MLflow's default store into {ROOT}: {sorted(after)}"


@pytest.fixture(scope="session", autouse=True)
def _isolated_local_dir(tmp_path_factory):
    """Embedded defaults (.local/) of code under test go to a temporary folder, not the repo's."""
    old = {k: os.environ.get(k) for k in ("TAMING_LOCAL_DIR", "MLFLOW_TRACKING_URI")}
    os.environ["TAMING_LOCAL_DIR"] = str(tmp_path_factory.mktemp("local"))
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """S3 + MLflow server + Ray, started together (MLflow boots while Ray starts)."""
    root = tmp_path_factory.mktemp("services")
    s3 = services.S3Server(root).start()
    mlflow = services.MlflowServer(root).start(wait=False)
    os.environ.update(s3.env())  # before Ray starts, so its workers see the S3 endpoint
    os.environ.update(mlflow.env())
    import ray

    from infra.cluster import ensure_ray

    try:
        ensure_ray(num_cpus=4)
        mlflow.wait()
        yield {"s3": s3, "mlflow": mlflow}
    finally:
        ray.shutdown()
        mlflow.stop()
        s3.stop()
        for k in ("AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI"):
            os.environ.pop(k, None)


@pytest.fixture
def s3_bucket(stack):
    """A fresh bucket for one test; yields its ``s3://`` URI."""
    import s3fs

    name = f"test-{uuid.uuid4().hex[:10]}"
    fs = s3fs.S3FileSystem()
    fs.mkdir(name)
    yield f"s3://{name}"


@pytest.fixture
def mlflow_client(stack):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=stack["mlflow"].uri)
