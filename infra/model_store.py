"""Where models live: local paths, ``s3://`` URIs and the MLflow model registry (``models:/name@alias``).

A model URI may name
- a native checkpoint (``*.safetensors``, see ``models.checkpoint``), local or on S3;
- an official taming release (a folder with ``configs/model.yaml`` + ``checkpoints/last.ckpt``, or
  the ``.ckpt`` file), local or on S3;
- a registered model, ``models:/<name>@<alias>`` or ``models:/<name>/<version>``, whose artifacts
  hold a native checkpoint (as :func:`register` logs it).
Remote files are copied once into a local cache keyed by URI. Every load reports the sha256 of
the weights, so outputs can record exactly which model made them.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra import io, tracking

NATIVE_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class LoadedModel:
    model: Any  # torch.nn.Module (VQGAN, GPT, ...)
    uri: str  # as given
    sha256: str  # of the weights file
    kind: str  # "native" | "taming"
    extra: dict[str, Any]


def _cache_dir(uri: str) -> Path:
    d = tracking.local_dir() / "model-cache" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    d.mkdir(parents=True, exist_ok=True)
    return d


def local_path(uri: str) -> Path:
    """A local file or folder holding what ``uri`` names (downloaded once if remote)."""
    if uri.startswith("models:/"):
        mlflow = tracking.configured_mlflow()  # this process's tracking/registry URIs, as the stages use
        dest = _cache_dir(uri)
        try:
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))
        except Exception as e:  # noqa: BLE001 - MlflowException, RestException, ...
            raise FileNotFoundError(
                f"cannot resolve {uri} in the MLflow registry at {tracking.tracking_uri()}: {e}"
            ) from None
    if io.is_remote(uri):
        if not io.exists(uri):
            raise FileNotFoundError(f"model {uri} does not exist")
        fs, path = io.filesystem(uri)
        dest = _cache_dir(uri) / Path(path).name
        if not dest.exists():
            fs.get(path, str(dest), recursive=fs.isdir(path))
        return dest
    p = Path(io.normalize(uri))
    if not p.exists():
        raise FileNotFoundError(f"model {uri} does not exist")
    return p


def resolve_weights(uri: str, filename: str) -> Path:
    """A local path of the weights: ``uri`` (local / s3), else the torch hub cache; clear error if absent."""
    import torch

    if uri:
        return local_path(uri)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not cached.is_file():
        raise FileNotFoundError(
            f"weights {filename} not found: set weights_uri (a local path or s3:// URI of the official file) "
            f"or put the file at {cached}"
        )
    return cached


def file_sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load(uri: str) -> LoadedModel:
    """Load the model that ``uri`` names (see the module docstring)."""
    from models import checkpoint

    if not uri.startswith("models:/") and io.exists(io.join(io.normalize(uri), io.MANIFEST_NAME)):
        uri = io.read_manifest(uri).data_uris()[0]  # a committed stage output (e.g. train_vqgan's): its model
    p = local_path(uri)
    if p.is_dir():
        natives = sorted(p.rglob(f"*{NATIVE_SUFFIX}"))
        if natives:
            p = natives[0]
    if p.suffix == NATIVE_SUFFIX:
        model, extra = checkpoint.load_native(p)
        return LoadedModel(model.eval(), uri, file_sha256(p), "native", extra)
    imported = checkpoint.load_taming(p)
    ckpt, _ = checkpoint.resolve_release(p)
    return LoadedModel(imported.model.eval(), uri, file_sha256(ckpt), "taming", {"target": imported.target})


def load_first_stage(uri: str) -> LoadedModel:
    from models.vqgan import VQGAN

    loaded = load(uri)
    if not isinstance(loaded.model, VQGAN):
        raise TypeError(f"{uri} holds a {type(loaded.model).__name__}, not a VQGAN tokenizer")
    return loaded


def register(
    model: Any,
    name: str,
    alias: str | None = None,
    tags: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> int:
    """Log ``model`` as a native checkpoint in the active MLflow run and register it under ``name``.

    Returns the new version; ``alias`` (e.g. ``candidate``) is pointed at it. Later stages read it
    back with ``models:/<name>@<alias>``.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    from infra.pyfunc_model import NativeCheckpoint
    from models import checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}{NATIVE_SUFFIX}"
        checkpoint.save_native(model, path, extra)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=NativeCheckpoint(),
            artifacts={"checkpoint": str(path)},
            pip_requirements=["torch", "safetensors", "taming-pipeline"],
            registered_model_name=name,
        )
    version = int(info.registered_model_version)
    client = MlflowClient(tracking.tracking_uri())
    if alias:
        client.set_registered_model_alias(name, alias, version)
    for k, v in (tags or {}).items():
        client.set_model_version_tag(name, str(version), k, str(v))
    return version
