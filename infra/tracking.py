"""MLflow tracking: one parent run per pipeline run, one child run per stage.

Each stage run records its resolved config as flat params plus a ``config.yaml`` artifact, its
input/output URIs as tags, its counts and timings as metrics, and preview images. With no
``MLFLOW_TRACKING_URI`` set, tracking is embedded: a sqlite database under ``.local/`` (no server
needed; browse it with ``mlflow ui --backend-store-uri sqlite:///.local/mlflow.db``). Set
``MLFLOW_TRACKING_URI`` to use a tracking server; its database backend also serves the model
registry that later stages read ``models:/name@alias`` from.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from infra import config as config_lib
from infra import io

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


def _mlflow():
    import mlflow

    uri = tracking_uri()
    if mlflow.get_tracking_uri() != uri:
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
    return mlflow


def configured_mlflow():
    """The mlflow module with its tracking and registry URIs set to :func:`tracking_uri`."""
    return _mlflow()


def set_experiment(name: str = DEFAULT_EXPERIMENT) -> str:
    """Select (creating if needed) the experiment; returns its id."""
    mlflow = _mlflow()
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        artifact_location = None
        if tracking_uri().startswith("sqlite:"):  # embedded: keep artifacts beside the database
            artifact_location = (local_dir() / "mlartifacts").as_uri()
        exp_id = mlflow.create_experiment(name, artifact_location=artifact_location)
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def active_run_id() -> str | None:
    mlflow = _mlflow()
    run = mlflow.active_run()
    return run.info.run_id if run else None


def _log_config(mlflow, cfg: Any) -> None:
    params = config_lib.flatten(config_lib.to_dict(cfg))
    mlflow.log_params({k: str(v)[:_MAX_PARAM_LEN] for k, v in params.items()})
    mlflow.log_text(config_lib.to_yaml(cfg), "config.yaml")


@contextlib.contextmanager
def pipeline_run(name: str, cfg: Any, experiment: str = DEFAULT_EXPERIMENT) -> Iterator[str]:
    """The parent run of one pipeline run; yields its run id."""
    mlflow = _mlflow()
    set_experiment(experiment)
    with mlflow.start_run(run_name=name) as run:
        mlflow.set_tags({"kind": "pipeline", "code_version": io.code_version()})
        _log_config(mlflow, cfg)
        log.info("MLflow run %s (experiment %r) at %s", run.info.run_id, experiment, tracking_uri())
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
        tags = {"kind": "stage", "stage": stage, "output_uri": output_uri, "code_version": io.code_version()}
        tags.update({f"input_uri.{i}": u for i, u in enumerate(input_uris)})
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


def log_dict(data: dict[str, Any], artifact_file: str) -> None:
    _mlflow().log_dict(data, artifact_file)
