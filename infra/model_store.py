"""Where models live: local paths, ``s3://`` URIs and the MLflow model registry (``models:/name@alias``).

A model URI names, and is read by, one of these declared formats (never a guess):
- a native checkpoint file (``*.safetensors``, ``models.checkpoint``), local or on S3;
- an official taming release (a folder with ``checkpoints/last.ckpt`` and ``configs/``, or its
  ``.ckpt`` file), local or on S3 (``models.taming_release``);
- a committed stage output that holds a model (``train_vqgan``'s, ``train_gpt``'s): the one file
  its manifest lists;
- a registered model, ``models:/<name>@<alias>`` or ``models:/<name>/<version>``: the checkpoint its
  ``MLmodel`` file names (as :func:`register` logs it).

:func:`describe` reads what a model is (kind, config, the facts it carries, the sha256 of its
weights) from its header alone, for the checks a stage's plan makes before any work; :func:`load`
loads the weights once, where the work runs, and can insist on the sha256 the plan saw.

Remote models are copied into a local cache keyed by their content as the store reports it (S3:
each file's ETag and size; the registry: the immutable version an alias points to now), through a
temporary folder renamed into place once complete: a changed object is fetched again, and a
download that died half-way is never used.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from infra import stage, storage, tracking

NATIVE_SUFFIX = ".safetensors"
Format = Literal["native", "taming"]


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


def _registered_checkpoint(folder: Path, uri: str) -> Path:
    """The checkpoint a registered model's ``MLmodel`` names (its ``checkpoint`` artifact)."""
    mlmodel = folder / "MLmodel"
    try:
        flavor = yaml.safe_load(mlmodel.read_text())["flavors"]["python_function"]
        rel = flavor["artifacts"]["checkpoint"]["path"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        raise stage.InputError(
            f"{uri} is not a model registered by taming-pipeline (its MLmodel names no checkpoint artifact)"
        ) from None
    return folder / rel


def local_path(uri: str) -> Path:
    """A local file or folder holding what ``uri`` names (fetched once per content if remote); for
    a registered model, its checkpoint file."""
    if uri.startswith("models:/"):
        name, version = tracking.model_version(uri)  # the alias as it points now
        key = f"{tracking.tracking_uri()}|{name}/{version}"
        folder = _cached(key, lambda d: tracking.download_model(name, version, d))
        entries = list(folder.iterdir())
        return _registered_checkpoint(entries[0] if len(entries) == 1 else folder, uri)
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


def pin(uri: str) -> tuple[str, str | None, int | None, str | None]:
    """``uri`` pinned, so that every actor loads the same version (a registry alias resolved to its
    version now), with where it came from: the registry name and version, and the MLflow run that
    made it (the registering run, or a committed output's run). A committed output that registered
    its model (a pipeline's ``train_gpt`` with ``register_name``) names that version too: the same
    weights, so the registry gate can find the samples' generator either way."""
    if uri.startswith("models:/"):
        info = tracking.model_version_info(uri)  # FileNotFoundError naming the URI and registry
        return f"models:/{info['name']}/{info['version']}", info["name"], info["version"], info["run_id"]
    if not stage.is_committed(uri):
        return uri, None, None, None
    m = stage.read_manifest(uri)
    reg = m.registered or {}
    version = int(reg["version"]) if reg.get("version") is not None else None
    return uri, reg.get("name"), version, m.mlflow_run_id


def generator_version(g: Any) -> tuple[str, int] | None:
    """The registry name and version of the generator behind a generated dataset (its descriptor's
    ``Generation``): as recorded, else the version its committed ``train_gpt`` output registered."""
    if g.registry_name and g.registry_version is not None:
        return g.registry_name, int(g.registry_version)
    _, name, version, _ = pin(g.pinned_uri)
    return (name, version) if name and version is not None else None


def resolve_weights(uri: str, filename: str, key: str = "weights_uri") -> Path:
    """A local path of the weights: ``uri`` (local / s3), else the torch hub cache; a missing file's
    error names it and the config ``key`` that sets it."""
    import torch

    if uri:
        try:
            return local_path(uri)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{key}={uri}: {e}") from None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not cached.is_file():
        raise FileNotFoundError(
            f"weights {filename} not found: set {key} (a local path or s3:// URI of the official file) "
            f"or put the file at {cached}"
        )
    return cached


file_sha256 = storage.file_sha256


# --------------------------------------------------------------------------- headers


@dataclass(frozen=True)
class ModelHeader:
    """What a model URI holds, from its header alone (no weights loaded)."""

    uri: str  # as given
    path: Path  # the local weights file (native) or release folder/ckpt (taming)
    sha256: str  # of the weights file
    format: Format
    kind: Literal["vqgan", "gpt", "net2net", "classifier"]
    config: Any  # VQGANConfig (vqgan), GPTConfig (gpt), models.taming_release.TransformerSpec (net2net)
    extra: dict[str, Any]  # native checkpoints: the facts the stage that wrote it recorded


def _model_file(uri: str) -> tuple[Path, Format, str | None]:
    """The local weights file (or release) ``uri`` names, its format, and the sha256 a committed
    output's manifest records for it (None for other locations)."""
    recorded = None
    if not uri.startswith("models:/") and stage.is_committed(uri):
        m = stage.read_manifest(uri)  # a committed stage output: the model file it holds
        files = [f for f in m.files if f.path.endswith(NATIVE_SUFFIX)]
        if len(files) != 1:
            raise stage.InputError(f"{uri} is a committed {m.stage} output that holds no model")
        uri, recorded = m.data_uris()[m.files.index(files[0])], files[0].sha256
    p = local_path(uri)
    if p.suffix == NATIVE_SUFFIX:
        return p, "native", recorded
    if p.is_dir() or p.suffix == ".ckpt":
        return p, "taming", recorded
    raise stage.InputError(
        f"{uri}: not a model format taming-pipeline reads (a native *.safetensors checkpoint, an official "
        "taming release folder or its .ckpt, a committed train_vqgan/train_gpt output, or models:/...)"
    )


def describe(uri: str) -> ModelHeader:
    """What ``uri`` holds (see :class:`ModelHeader`), without loading its weights."""
    from models import checkpoint, taming_release

    path, fmt, recorded = _model_file(uri)
    if fmt == "native":
        h = checkpoint.read_header(path)
        sha = file_sha256(path)
        _check_sha(uri, recorded, sha, "its manifest records")
        return ModelHeader(uri, path, sha, fmt, h.kind, h.config, h.extra)
    release = taming_release.read_release(path)
    sha = file_sha256(release.ckpt)
    if release.is_transformer:
        return ModelHeader(uri, path, sha, fmt, "net2net", release.transformer(), {"target": release.target})
    return ModelHeader(uri, path, sha, fmt, "vqgan", release.first_stage_config(), {"target": release.target})


def describe_tokenizer(
    uri: str | None, sha256: str | None, what: str, key: str = "tokenizer_uri"
) -> ModelHeader:
    """The header of the VQGAN at ``uri``, which must have the weights of ``sha256`` (the one
    ``what`` was made with); a clear :class:`~infra.stage.InputError` when it cannot be found,
    is not a VQGAN, or differs."""
    if not uri:
        raise stage.InputError(f"{what} records no tokenizer URI")
    try:
        header = describe(uri)
    except FileNotFoundError as e:
        raise stage.InputError(
            f"the tokenizer of {what} cannot be found: {e} (sha256 {sha256}; set {key} to a copy)"
        ) from None
    if header.kind != "vqgan":
        raise stage.InputError(f"{uri} holds a {header.kind} model, not a VQGAN tokenizer")
    if sha256 and header.sha256 != sha256:
        raise stage.InputError(
            f"the tokenizer at {uri} has sha256 {header.sha256}, but {what} was made with sha256 {sha256}: "
            f"the file or alias changed since; point {key} at the original weights"
        )
    return header


def first_stage_header(uri: str, what: str = "") -> ModelHeader:
    """The header of the VQGAN tokenizer at ``uri`` (:class:`~infra.stage.InputError` otherwise)."""
    header = describe(uri)
    if header.kind != "vqgan":
        raise stage.InputError(f"{uri}{what} holds a {header.kind} model, not a VQGAN tokenizer")
    return header


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class LoadedModel:
    model: Any  # torch.nn.Module (VQGAN, GPT, Net2Net), eval mode
    uri: str  # as given
    sha256: str  # of the weights file
    format: Format
    extra: dict[str, Any]


def load(uri: str, sha256: str | None = None) -> LoadedModel:
    """Load the model ``uri`` names (see the module docstring); ``sha256``: the weights a plan saw
    (:class:`~infra.stage.InputError` if they changed since)."""
    from models import checkpoint, taming_release

    path, fmt, recorded = _model_file(uri)
    if fmt == "native":
        data = path.read_bytes()
        found = storage.sha256(data)
        _check_sha(uri, recorded, found, "its manifest records")
        _check_sha(uri, sha256, found)
        model, extra = checkpoint.from_bytes(data)
        return LoadedModel(model.eval(), uri, found, fmt, extra)
    imported = taming_release.load_taming(path)
    found = file_sha256(taming_release.resolve_release(path)[0])
    _check_sha(uri, sha256, found)
    return LoadedModel(imported.model.eval(), uri, found, fmt, {"target": imported.target})


def _check_sha(uri: str, want: str | None, found: str, what: str = "expected") -> None:
    if want and want != found:
        raise stage.InputError(f"{uri} has sha256 {found}, {what} {want}: it changed since")


def load_first_stage(uri: str, sha256: str | None = None) -> LoadedModel:
    from models.vqgan import VQGAN

    loaded = load(uri, sha256)
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


# --------------------------------------------------------------------------- generators


@dataclass(frozen=True)
class GeneratorHeader:
    """A generator as its header describes it: everything sampling needs to plan, no weights."""

    uri: str
    sha256: str
    format: Format
    spec: Any  # models.net2net.GeneratorSpec
    gpt: Any  # models.gpt.GPTConfig
    first_stage: Any  # official releases: their bundled VQGAN's config (None: the spec's tokenizer)
    extra: dict[str, Any]


def _release_spec(t: Any, uri: str, sha256: str) -> Any:
    """The GeneratorSpec of an official release (its TransformerSpec): it decodes with its own first stage."""
    from models.net2net import GeneratorSpec

    return GeneratorSpec(
        condition=t.condition,
        codebook_size=t.first_stage.codebook_size,
        grid=t.grid,
        tokenizer_uri=uri,
        tokenizer_sha256=sha256,
        prefix_length=t.prefix_length,
    )


def describe_generator(uri: str) -> GeneratorHeader:
    """A ``train_gpt`` generator (native checkpoint, committed output, registry) or an official
    ``Net2NetTransformer`` release, from its header."""
    from models.net2net import GeneratorSpec

    header = describe(uri)
    if header.kind == "net2net":  # an official release: first stage and condition inside
        t = header.config
        spec = _release_spec(t, uri, header.sha256)
        return GeneratorHeader(uri, header.sha256, header.format, spec, t.gpt, t.first_stage, header.extra)
    if header.kind != "gpt" or "generator" not in header.extra:
        raise stage.InputError(
            f"{uri} holds a {header.kind} model without a generator spec, not a train_gpt generator"
        )
    spec = GeneratorSpec.from_dict(header.extra["generator"])
    return GeneratorHeader(uri, header.sha256, header.format, spec, header.config, None, header.extra)


@dataclass(frozen=True)
class LoadedGenerator:
    """A transformer ready to sample: the GPT, its :class:`~models.net2net.GeneratorSpec`, and (for
    official releases, which bundle it) the first stage."""

    gpt: Any  # models.gpt.GPT, eval mode
    spec: Any  # models.net2net.GeneratorSpec
    uri: str
    sha256: str  # of the weights file
    format: Format
    first_stage: Any = None  # official releases: their VQGAN


def load_generator(uri: str, sha256: str | None = None) -> LoadedGenerator:
    """The generator at ``uri`` (see :func:`describe_generator`), its weights loaded once."""
    from models import taming_release
    from models.gpt import GPT
    from models.net2net import GeneratorSpec, Net2Net

    loaded = load(uri, sha256)
    model = loaded.model
    if isinstance(model, Net2Net):
        t = taming_release.read_release(_model_file(uri)[0]).transformer()
        spec = _release_spec(t, uri, loaded.sha256)
        return LoadedGenerator(
            model.transformer.eval(), spec, uri, loaded.sha256, loaded.format, model.first_stage
        )
    if not isinstance(model, GPT) or "generator" not in loaded.extra:
        raise stage.InputError(
            f"{uri} holds a {type(model).__name__} without a generator spec, not a train_gpt generator"
        )
    spec = GeneratorSpec.from_dict(loaded.extra["generator"])
    return LoadedGenerator(model, spec, uri, loaded.sha256, loaded.format)


def load_tokenizer(uri: str, sha256: str) -> Any:
    """The VQGAN at ``uri`` with the weights of ``sha256`` (checked by :func:`describe_tokenizer`
    in a plan), loaded."""
    return load_first_stage(uri, sha256).model
