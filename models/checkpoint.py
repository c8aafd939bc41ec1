"""Our checkpoint formats: the native model file and the resumable training state.

Native: a safetensors file whose metadata carries the model kind and its full config, so a later
stage rebuilds the model from the file alone (no architecture flags, as nanoGPT's ``model_args``).
Loading is strict and executes no pickle; :func:`read_header` reads the kind, config and extra
facts without the weights (a plan checks a model before any work, the workers load it once).

Training state: the resumable state of a training run (weights, optimizers, EMA, step, data
position) as :func:`training_state_to_bytes` writes it: a torch archive of tensors and plain values
with a format tag, read back with ``weights_only=True``.

Official releases: ``models.taming_release`` (taming's first stages and transformers), and the
loaders of the preprocessing models beside them (``models.midas``, ``models.deeplab``), which read
a plain state_dict through :func:`read_state_dict`.
"""

from __future__ import annotations

import io
import json
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.evaluation import Classifier, ClassifierConfig
from models.gpt import GPT, GPTConfig
from models.vqgan import VQGAN, VQGANConfig, config_from_dict

FORMAT = "taming-pipeline"
FORMAT_VERSION = "1"
MAX_HEADER = 100_000_000


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked, with the reason."""


# --------------------------------------------------------------------------- native format

_KINDS: dict[str, tuple[type[nn.Module], Any]] = {
    "vqgan": (VQGAN, config_from_dict),
    "gpt": (GPT, lambda d: GPTConfig(**d)),
    "classifier": (Classifier, ClassifierConfig.from_dict),
}


@dataclass(frozen=True)
class NativeHeader:
    """What a native checkpoint declares about itself: the model kind, its config, the extra facts."""

    kind: str  # "vqgan" | "gpt" | "classifier"
    config: VQGANConfig | GPTConfig | ClassifierConfig
    extra: dict[str, Any]


def _kind_of(model: nn.Module) -> str:
    for kind, (cls, _) in _KINDS.items():
        if type(model) is cls:
            return kind
    raise CheckpointError(f"no native checkpoint kind for {type(model).__name__}")


def to_bytes(model: nn.Module, extra: dict[str, Any] | None = None) -> bytes:
    """Serialise ``model`` (weights + config + optional JSON-able ``extra``) to safetensors bytes."""
    from safetensors.torch import save

    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": _kind_of(model),
        "config": json.dumps(asdict(model.config)),
        "extra": json.dumps(extra or {}, sort_keys=True),
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # one metadata key: safetensors writes its metadata map in hash order, so several keys would
    # make the same model serialise to different bytes from run to run
    return save(tensors, metadata={FORMAT: json.dumps(meta, sort_keys=True)})


def _header_length(first8: bytes, size: int) -> int:
    if len(first8) < 8:
        raise CheckpointError("not a native checkpoint: file too short")
    (n,) = struct.unpack("<Q", first8)
    if n > size - 8 or n > MAX_HEADER:
        raise CheckpointError(
            "not a native checkpoint (safetensors header missing; pickled files are refused)"
        )
    return n


def parse_header(header: bytes) -> NativeHeader:
    """The :class:`NativeHeader` of a safetensors header (the JSON after the length)."""
    try:
        raw = json.loads(header).get("__metadata__") or {}
        meta = json.loads(raw[FORMAT]) if FORMAT in raw else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"not a native checkpoint (unreadable safetensors header: {e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"not a {FORMAT} checkpoint (no {FORMAT!r} metadata in its safetensors header)")
    kind = meta.get("kind")
    if kind not in _KINDS:
        raise CheckpointError(f"unknown checkpoint kind {kind!r}; known: {sorted(_KINDS)}")
    config = _KINDS[kind][1](json.loads(meta["config"]))
    return NativeHeader(kind, config, json.loads(meta.get("extra", "{}")))


def read_header(path: str | Path) -> NativeHeader:
    """The header of a native checkpoint file, without reading its weights."""
    path = Path(path)
    with open(path, "rb") as f:
        n = _header_length(f.read(8), path.stat().st_size)
        return parse_header(f.read(n))


def from_bytes(data: bytes) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from :func:`to_bytes` output; returns ``(model, extra)``."""
    from safetensors.torch import load

    n = _header_length(data[:8], len(data))
    header = parse_header(data[8 : 8 + n])
    model = _KINDS[header.kind][0](header.config)
    strict_load(model, load(data), what=f"native {header.kind} checkpoint")
    return model, header.extra


def save_native(model: nn.Module, path: str | Path, extra: dict[str, Any] | None = None) -> None:
    Path(path).write_bytes(to_bytes(model, extra))


def load_native(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    return from_bytes(Path(path).read_bytes())


# --------------------------------------------------------------------------- training state

TRAIN_STATE_FORMAT = "taming-pipeline-train-state"


def training_state_to_bytes(state: dict[str, Any]) -> bytes:
    """A training run's resumable state (tensors, optimizer states, ints, floats, strings) as bytes."""
    buf = io.BytesIO()
    torch.save({"format": TRAIN_STATE_FORMAT, "format_version": FORMAT_VERSION, "state": state}, buf)
    return buf.getvalue()


def training_state_from_bytes(data: bytes, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The state :func:`training_state_to_bytes` wrote; :class:`CheckpointError` for anything else."""
    try:
        obj = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated files, pickles beyond tensors, ...
        raise CheckpointError(f"not a readable training state: {str(e).splitlines()[0]}") from None
    if not isinstance(obj, dict) or obj.get("format") != TRAIN_STATE_FORMAT:
        raise CheckpointError(f"not a {TRAIN_STATE_FORMAT} file")
    return obj["state"]


# --------------------------------------------------------------------------- strict loading


def check_state(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], what: str) -> None:
    """Raise one :class:`CheckpointError` listing every missing key, unexpected key and bad shape."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if own[k].shape != state[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", shapes),
        ):
            if items:
                more = f" (+{len(items) - 8} more)" if len(items) > 8 else ""
                parts.append(f"{label}: {', '.join(items[:8])}{more}")
        raise CheckpointError(f"{what} does not fit the model: " + "; ".join(parts))


def strict_load(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``load_state_dict(strict=True)`` after :func:`check_state`."""
    check_state(module.state_dict(), state, what)
    module.load_state_dict(state, strict=True)


def read_state_dict(path: str | Path) -> Any:
    """What a release file of tensors holds (``torch.load`` with ``weights_only=True``: no pickled
    code runs); :class:`CheckpointError` for a file that needs arbitrary unpickling."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle.UnpicklingError and friends
        raise CheckpointError(f"{path} cannot be read without unpickling Python objects: {e}") from None


def load_release_state(model: nn.Module, state: Any, what: str) -> nn.Module:
    """``model`` with the plain state_dict ``state`` loaded strictly (BatchNorm counters, which
    releases may or may not carry, filled in), in eval mode."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{what} does not hold a plain state_dict of tensors")
    state = dict(state)
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked"):
            state.setdefault(k, v)
    strict_load(model, state, what)
    return model.eval()
