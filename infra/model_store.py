"""Where models live: local paths, ``s3://`` URIs and the MLflow model registry (``models:/name@alias``).

A model URI may name
- a native checkpoint (``*.safetensors``, see ``models.checkpoint``), local or on S3;
- an official taming release (a folder with ``configs/model.yaml`` + ``checkpoints/last.ckpt``, or
  the ``.ckpt`` file), local or on S3;
- a committed stage output that holds a model (``train_vqgan``'s), local or on S3;
- a registered model, ``models:/<name>@<alias>`` or ``models:/<name>/<version>``, whose artifacts
  hold a native checkpoint (as :func:`register` logs it).

Remote models are copied into a local cache keyed by their content as the store reports it (S3:
each file's ETag and size; the registry: the immutable version an alias points to now), through a
temporary folder renamed into place once complete: a changed object is fetched again, and a
download that died half-way is never used. Every load reports the sha256 of the weights, so outputs
record exactly which model made them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra import stage, storage, tracking

NATIVE_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class LoadedModel:
    model: Any  # torch.nn.Module (VQGAN, GPT, ...)
    uri: str  # as given
    sha256: str  # of the weights file
    kind: str  # "native" | "taming"
    extra: dict[str, Any]


def _cached(key: str, fetch) -> Path:
    """``<cache>/<key>``, filled once by ``fetch(tmp_dir)`` in a temporary folder and renamed into
    place (atomic; of two concurrent fetches the first rename wins and the other is dropped)."""
    root = tracking.local_dir() / "model-cache"
    final = root / hashlib.sha256(key.encode()).hexdigest()[:24]
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        fetch(tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # a concurrent fetch got there first
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _single(folder: Path) -> Path:
    """The one entry a cache folder holds (the file or folder that was fetched)."""
    entries = list(folder.iterdir())
    return entries[0] if len(entries) == 1 else folder


def local_path(uri: str) -> Path:
    """A local file or folder holding what ``uri`` names (fetched once per content if remote)."""
    if uri.startswith("models:/"):
        name, version = tracking.model_version(uri)  # the alias as it points now
        key = f"{tracking.tracking_uri()}|{name}/{version}"
        return _single(_cached(key, lambda d: tracking.download_model(name, version, d)))
    if storage.is_remote(uri):
        entries = storage.list_entries(uri)
        if not entries:
            raise FileNotFoundError(f"model {uri} does not exist")
        key = "|".join(f"{storage.relative(e.uri, uri)}:{e.size}:{e.version}" for e in entries)
        name = uri.rstrip("/").rsplit("/", 1)[-1]

        def fetch(d: Path) -> None:
            for e in entries:
                rel = storage.relative(e.uri, uri) if e.uri != uri else ""
                dest = d / name / rel if rel else d / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                fs, path = storage.filesystem(e.uri)
                fs.get_file(path, str(dest))
                if dest.stat().st_size != e.size:
                    raise OSError(f"download of {e.uri} incomplete: {dest.stat().st_size} of {e.size} bytes")

        return _cached(f"{uri}|{key}", fetch) / name
    p = Path(storage.normalize(uri))
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


file_sha256 = storage.file_sha256


def load(uri: str) -> LoadedModel:
    """Load the model that ``uri`` names (see the module docstring)."""
    from models import checkpoint

    if not uri.startswith("models:/") and stage.is_committed(uri):
        # a committed stage output (e.g. train_vqgan's): the model it holds
        uri = stage.read_manifest(uri).data_uris()[0]
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
        raise stage.InputError(f"{uri} holds a {type(loaded.model).__name__}, not a VQGAN tokenizer")
    return loaded


def register(
    data: bytes,
    name: str,
    alias: str | None = None,
    tags: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Register the native checkpoint ``data`` (``models.checkpoint.to_bytes``) under ``name`` in the
    active MLflow run; returns ``{"name", "version", "uri"}``. ``alias`` (e.g. ``candidate``) is
    pointed at the new version; later stages read it back with ``models:/<name>@<alias>``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}{NATIVE_SUFFIX}"
        path.write_bytes(data)
        return tracking.register_model(path, name, alias, tags or {})


@dataclass(frozen=True)
class LoadedGenerator:
    """A transformer ready to sample: the GPT, its :class:`~models.net2net.GeneratorSpec`, and (for
    official releases, which bundle it) the first stage; ``tokenizer()`` loads it otherwise."""

    gpt: Any  # models.gpt.GPT, eval mode
    spec: Any  # models.net2net.GeneratorSpec
    uri: str
    sha256: str  # of the weights file
    kind: str  # "native" | "taming"
    extra: dict[str, Any]
    first_stage: Any = None  # official releases: their VQGAN

    def tokenizer(self) -> Any:
        """The VQGAN that decodes this generator's codes: the bundled first stage of an official
        release, else the tokenizer the spec names, verified against its sha256."""
        if self.first_stage is not None:
            return self.first_stage
        return load_tokenizer(
            self.spec.tokenizer_uri, self.spec.tokenizer_sha256, f"generator {self.uri}"
        ).model


def load_tokenizer(uri: str | None, sha256: str | None, what: str) -> LoadedModel:
    """The VQGAN at ``uri``, which must have the weights of ``sha256`` (the one ``what`` was made
    with); a clear :class:`~infra.stage.InputError` when it cannot be found or differs."""
    if not uri:
        raise stage.InputError(f"{what} records no tokenizer URI")
    try:
        loaded = load_first_stage(uri)
    except FileNotFoundError as e:
        raise stage.InputError(
            f"the tokenizer of {what} cannot be found: {e} (sha256 {sha256}; set tokenizer_uri to a copy)"
        ) from None
    if sha256 and loaded.sha256 != sha256:
        raise stage.InputError(
            f"the tokenizer at {uri} has sha256 {loaded.sha256}, but {what} was made with sha256 {sha256}: "
            "the file or alias changed since; point tokenizer_uri at the original weights"
        )
    return loaded


def load_generator(uri: str) -> LoadedGenerator:
    """A generator from a native ``train_gpt`` checkpoint (path, ``s3://``, a committed ``train_gpt``
    output, ``models:/name@alias``) or an official taming ``Net2NetTransformer`` release."""
    from models.gpt import GPT
    from models.net2net import GeneratorSpec, Net2Net

    loaded = load(uri)
    model = loaded.model
    if isinstance(model, Net2Net):  # an official release: first stage and condition inside
        first = model.first_stage
        side = first.config.resolution // first.config.downsample_factor
        cond_stage = model.cond_stage.config if model.cond_stage is not None else None
        prefix = 1
        if cond_stage is not None:
            prefix = (cond_stage.resolution // cond_stage.downsample_factor) ** 2
        elif model.cond.mode == "coord":
            prefix = side * side
        spec = GeneratorSpec(
            condition=model.cond,
            codebook_size=first.config.codebook_size,
            grid=(side, side),
            tokenizer_uri=uri,
            tokenizer_sha256=loaded.sha256,
            prefix_length=prefix,
        )
        return LoadedGenerator(
            model.transformer.eval(), spec, uri, loaded.sha256, loaded.kind, loaded.extra, first
        )
    if not isinstance(model, GPT) or "generator" not in loaded.extra:
        raise stage.InputError(
            f"{uri} holds a {type(model).__name__} without a generator spec, not a train_gpt generator"
        )
    spec = GeneratorSpec.from_dict(loaded.extra["generator"])
    return LoadedGenerator(model, spec, uri, loaded.sha256, loaded.kind, loaded.extra)
