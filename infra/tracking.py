"""MLflow tracking: one parent run per pipeline run, one child run per stage.

Each stage run records its resolved config as flat params plus a ``config.yaml`` artifact, its
input/output URIs as tags, its counts and timings as metrics, and preview images. With no
``MLFLOW_TRACKING_URI`` set, tracking is embedded: a sqlite database under ``.local/`` (no server
needed; browse it with ``mlflow ui --backend-store-uri sqlite:///.local/mlflow.db``). Set
``MLFLOW_TRACKING_URI`` to use a tracking server; its database backend also serves the model
registry that later stages read ``models:/name@alias`` from.

Everything the project logs or registers goes through this module: the stages' child runs, the
rank-0 logging of Ray Train workers (:func:`resume_run`), and the model registry
(:func:`register_model`, :func:`download_model`). The tracking URI is also exported to the
environment, so that subprocesses MLflow itself starts log to the same place (never to a stray
``./mlflow.db``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from infra import config as config_lib
from infra.storage import redact

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "taming-pipeline"
_MAX_PARAM_LEN = 500


def local_dir() -> Path:
    """State of the embedded defaults (``TAMING_LOCAL_DIR``, else ``.local/`` in the repo root)."""
    env = os.environ.get("TAMING_LOCAL_DIR")
    return Path(env).resolve() if env else Path(__file__).resolve().parent.parent / ".local"


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    d = local_dir()
    d.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{d / 'mlflow.db'}"


# MLflow's own console lines, per run and per artifact transfer: a run's "View run ... at <url>" pair
# at every end (twice per training stage: worker and driver) and tqdm bars for every registered model.
# The pipeline names the parent run and the UI command at its end instead. An explicit setting wins.
QUIET_MLFLOW_ENV = {
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


_READY: set[str] = set()  # sqlite databases this process has seen created


def _mlflow():
    for k, v in QUIET_MLFLOW_ENV.items():
        os.environ.setdefault(k, v)
    import mlflow

    uri = tracking_uri()
    os.environ["MLFLOW_TRACKING_URI"] = uri  # subprocesses MLflow starts (model validation) too
    if uri.startswith("sqlite:///") and uri not in _READY:
        _create_sqlite(uri)
        _READY.add(uri)
    if mlflow.get_tracking_uri() != uri:
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
    return mlflow


def _create_sqlite(uri: str) -> None:
    """MLflow creates and migrates a new sqlite database on first use; two processes doing it at
    once collide (sqlalchemy's "duplicate column name"). One at a time, under a file lock."""
    import fcntl

    from mlflow.tracking import MlflowClient

    path = Path(uri[len("sqlite:///") :])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        MlflowClient(uri).search_experiments(max_results=1)  # creates and migrates it, or reads it


def fail_if_running(run_id: str) -> None:
    """Mark an MLflow run that is still ``RUNNING`` as ``FAILED`` (its process was killed)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri())
    try:
        status = client.get_run(run_id).info.status
    except Exception:  # noqa: BLE001 - deleted, or another tracking server: nothing to mark
        return
    if status == "RUNNING":
        client.set_terminated(run_id, "FAILED")
        log.info("MLflow run %s was left running by a run that stopped: marked failed", run_id)


@functools.cache
def code_version() -> str:
    """The git commit of this checkout (``+dirty`` with local changes), else the package version."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        if sha:
            dirty = subprocess.run(
                ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
            return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"taming-pipeline=={version('taming-pipeline')}"
    except PackageNotFoundError:
        return "unknown"


def set_experiment(name: str = DEFAULT_EXPERIMENT) -> str:
    """Select (creating if needed) the experiment; returns its id."""
    mlflow = _mlflow()
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        artifact_location = None
        if tracking_uri().startswith("sqlite:"):  # embedded: keep artifacts beside the database
            artifact_location = (local_dir() / "mlartifacts").as_uri()
        try:
            exp_id = mlflow.create_experiment(name, artifact_location=artifact_location)
        except mlflow.exceptions.MlflowException:
            exp = mlflow.get_experiment_by_name(name)  # another process created it in between
            if exp is None:
                raise
            exp_id = exp.experiment_id
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def _log_config(mlflow, cfg: Any) -> None:
    params = config_lib.flatten(config_lib.to_dict(cfg))
    mlflow.log_params({k: redact(str(v))[:_MAX_PARAM_LEN] for k, v in params.items()})
    mlflow.log_text(redact(config_lib.to_yaml(cfg)), "config.yaml")


@contextlib.contextmanager
def pipeline_run(name: str, cfg: Any, experiment: str = DEFAULT_EXPERIMENT) -> Iterator[str]:
    """The parent run of one pipeline run; yields its run id."""
    mlflow = _mlflow()
    set_experiment(experiment)
    with mlflow.start_run(run_name=name) as run:
        mlflow.set_tags({"kind": "pipeline", "code_version": code_version()})
        _log_config(mlflow, cfg)
        log.info("MLflow run %s (experiment %r) at %s", run.info.run_id, experiment, redact(tracking_uri()))
        yield run.info.run_id


@contextlib.contextmanager
def stage_run(
    stage: str, cfg: Any, input_uris: list[str], output_uri: str, experiment: str = DEFAULT_EXPERIMENT
) -> Iterator[str]:
    """A child run of the active pipeline run (or a top-level run when the stage runs alone)."""
    mlflow = _mlflow()
    parent = mlflow.active_run()
    if parent is None:
        set_experiment(experiment)
    with mlflow.start_run(run_name=stage, nested=parent is not None) as run:
        tags = {
            "kind": "stage",
            "stage": stage,
            "output_uri": redact(output_uri),
            "code_version": code_version(),
        }
        tags.update({f"input_uri.{i}": redact(u) for i, u in enumerate(input_uris)})
        mlflow.set_tags(tags)
        _log_config(mlflow, cfg)
        yield run.info.run_id


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    _mlflow().log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def set_tags(tags: dict[str, Any]) -> None:
    _mlflow().set_tags({k: str(v) for k, v in tags.items()})


def log_image(image: np.ndarray, artifact_file: str) -> None:
    """Log a uint8 image (H, W) or (H, W, 3) as a PNG artifact."""
    _mlflow().log_image(image, artifact_file=artifact_file)


def artifact_location(run_id: str, artifact_file: str) -> str:
    """Where a run's artifact can be opened: a local path for a local artifact store, else its
    URI (``mlflow-artifacts:/...``, ``s3://...``: ``mlflow artifacts download`` fetches it)."""
    mlflow = _mlflow()
    root = mlflow.get_run(run_id).info.artifact_uri.rstrip("/")
    where = f"{root}/{artifact_file}"
    return where[len("file://") :] if where.startswith("file://") else where


def image_artifacts(run_id: str) -> list[str]:
    """Where the pictures a run logged can be opened (:func:`artifact_location`), newest first
    within each folder (two levels deep: ``samples/grid.png``, ``reconstructions/step_*.png``)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri())
    found: list[str] = []
    for top in client.list_artifacts(run_id):
        entries = client.list_artifacts(run_id, top.path) if top.is_dir else [top]
        pngs = sorted((e.path for e in entries if e.path.endswith(".png")), reverse=True)
        found += pngs[:1] if top.is_dir else pngs  # a folder of steps: its newest
    return [artifact_location(run_id, p) for p in found]


def log_dict(data: dict[str, Any], artifact_file: str) -> None:
    _mlflow().log_dict(data, artifact_file)


def log_text(text: str, artifact_file: str) -> None:
    _mlflow().log_text(text, artifact_file)


@contextlib.contextmanager
def resume_run(run_id: str | None, uri: str | None) -> Iterator[bool]:
    """Log into an existing run from another process (rank 0 of a Ray Train worker group).

    ``uri`` is the tracking URI of the process that opened the run (workers may not share its
    environment). Yields whether a run is active (False when ``run_id`` is None: log nothing).
    """
    if run_id is None:
        yield False
        return
    if uri:
        os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow = _mlflow()
    with mlflow.start_run(run_id=run_id):
        yield True


# --------------------------------------------------------------------------- the model registry


def register_model(
    checkpoint_path: Path, name: str, alias: str | None, tags: dict[str, Any]
) -> dict[str, Any]:
    """Log a native checkpoint file in the active run as a pyfunc model and register it as ``name``.

    ``alias`` (e.g. ``candidate``) is pointed at the new version and ``tags`` set on it. Returns
    ``{"name", "version", "uri"}`` with the immutable ``models:/<name>/<version>``.
    """
    from mlflow.tracking import MlflowClient

    from infra.pyfunc_model import NativeCheckpoint

    mlflow = _mlflow()
    # mlflow warns on every log that a Python-object model is cloudpickled: by design here (the
    # model is its checkpoint file, the class a few lines), so not on the console
    pyfunc_log = logging.getLogger("mlflow.pyfunc")
    level = pyfunc_log.level
    pyfunc_log.setLevel(logging.ERROR)
    try:
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=NativeCheckpoint(),
            artifacts={"checkpoint": str(checkpoint_path)},
            pip_requirements=["torch", "safetensors", "taming-pipeline"],
            registered_model_name=name,
        )
    finally:
        pyfunc_log.setLevel(level)
    version = int(info.registered_model_version)
    client = MlflowClient(tracking_uri())
    if alias:
        client.set_registered_model_alias(name, alias, str(version))
    for k, v in tags.items():
        client.set_model_version_tag(name, str(version), k, str(v))
    return {"name": name, "version": version, "uri": f"models:/{name}/{version}"}


def model_version(uri: str) -> tuple[str, int]:
    """``models:/<name>@<alias>`` or ``models:/<name>/<version>`` -> (name, version) now."""
    info = model_version_info(uri)
    return info["name"], info["version"]


def model_version_info(uri: str) -> dict[str, Any]:
    """``models:/<name>@<alias>`` or ``models:/<name>/<version>`` -> ``{"name", "version", "run_id"}``
    of the version it names now (``run_id``: the MLflow run that logged it)."""
    from mlflow.tracking import MlflowClient

    _mlflow()
    rest = uri[len("models:/") :]
    client = MlflowClient(tracking_uri())
    try:
        if "@" in rest:
            name, alias = rest.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        else:
            name, version = rest.rsplit("/", 1)
            mv = client.get_model_version(name, version)
        return {"name": name, "version": int(mv.version), "run_id": mv.run_id}
    except Exception as e:  # noqa: BLE001 - MlflowException, RestException, ValueError
        raise FileNotFoundError(
            f"cannot resolve {uri} in the MLflow registry at {redact(tracking_uri())}: "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__} "
            "(check the name and alias, and MLFLOW_TRACKING_URI)"
        ) from None


def tag_model_version(name: str, version: int, tags: dict[str, Any]) -> None:
    """Set ``tags`` on a registered model version (e.g. the ``eval/*`` scores of a generator)."""
    from mlflow.tracking import MlflowClient

    _mlflow()
    client = MlflowClient(tracking_uri())
    for k, v in tags.items():
        client.set_model_version_tag(name, str(version), k, str(v))


def evaluation_tags(figures: dict[str, float], protocol: str, output_uri: str) -> dict[str, str]:
    """The ``eval/*`` tags an evaluated model version carries: its figures, the evaluation's
    protocol (what they are comparable by) and where the evaluation is committed."""
    tags = {f"eval/{k}": f"{v:.6g}" for k, v in figures.items()}
    tags.update({"eval/protocol": protocol, "eval/output_uri": output_uri})
    return tags


def model_version_tags(name: str, version: int) -> dict[str, str]:
    """The tags of a registered model version."""
    from mlflow.tracking import MlflowClient

    _mlflow()
    return dict(MlflowClient(tracking_uri()).get_model_version(name, str(version)).tags)


def set_model_alias(name: str, alias: str, version: int) -> None:
    """Point ``models:/<name>@<alias>`` at ``version``."""
    from mlflow.tracking import MlflowClient

    _mlflow()
    MlflowClient(tracking_uri()).set_registered_model_alias(name, alias, str(version))


def download_model(name: str, version: int, dest: Path) -> Path:
    """The artifacts of a registered model version, downloaded into ``dest``."""
    mlflow = _mlflow()
    return Path(
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(dest))
    )
