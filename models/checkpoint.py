"""Checkpoint formats: our native one, and imports of official taming releases.

Native: a safetensors file whose metadata carries the model kind and its full config, so a later
stage rebuilds the model from the file alone (no architecture flags). Loading is strict and
executes no pickle.

Training state: the resumable state of a training run (weights, optimizers, EMA, step, data
position) as :func:`training_state_to_bytes` writes it: a torch archive of tensors and plain values
with a format tag, read back with ``weights_only=True``.

Official: ``load_taming(path)`` imports a taming first-stage release, the folder a user downloads
(``configs/model.yaml`` + ``checkpoints/last.ckpt``) or the ckpt with its yaml. ``VQModel``,
``GumbelVQ`` and ``VQSegmentationModel`` become our :class:`~models.vqgan.VQGAN`; with
``with_loss=True`` the ``loss.*`` weights (LPIPS + discriminator) go into our
:class:`~models.losses.VQGANLoss`. Anything we cannot represent is a :class:`CheckpointError`, and
so is a missing key or a shape mismatch: never a silent partial load. ``torch.load`` runs with
``weights_only=True``; a file that needs arbitrary unpickling is refused unless ``allow_pickle``.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from models.deeplab import DeepLabConfig, DeepLabMSC
from models.dpt import DPTDepth
from models.gpt import GPT, GPTConfig
from models.losses import VQGANLoss, VQGANLossConfig
from models.midas import MidasNet, MidasSmall
from models.net2net import ConditionConfig, Net2Net
from models.quantize import QuantizerConfig
from models.vqgan import VQGAN, VQGANConfig, config_from_dict

FORMAT = "taming-pipeline"
FORMAT_VERSION = "1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked, with the reason."""


# --------------------------------------------------------------------------- native format

_KINDS: dict[str, tuple[type[nn.Module], Any]] = {
    "vqgan": (VQGAN, config_from_dict),
    "gpt": (GPT, lambda d: GPTConfig(**d)),
}


def register_kind(kind: str, cls: type[nn.Module], from_dict: Any) -> None:
    """Let another model family (e.g. the GPT) use the native format."""
    _KINDS[kind] = (cls, from_dict)


def _kind_of(model: nn.Module) -> str:
    for kind, (cls, _) in _KINDS.items():
        if type(model) is cls:
            return kind
    raise CheckpointError(f"no native checkpoint kind registered for {type(model).__name__}")


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


def _header(data: bytes) -> dict[str, Any]:
    if len(data) < 8:
        raise CheckpointError("not a native checkpoint: file too short")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8 or n > 100_000_000:
        raise CheckpointError(
            "not a native checkpoint (safetensors header missing; pickled files are refused)"
        )
    try:
        return json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"not a native checkpoint (unreadable safetensors header: {e})") from None


def from_bytes(data: bytes) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from :func:`to_bytes` output; returns ``(model, extra)``."""
    from safetensors.torch import load

    raw = _header(data).get("__metadata__") or {}
    try:
        meta = json.loads(raw[FORMAT]) if FORMAT in raw else raw
    except json.JSONDecodeError:
        raise CheckpointError("native checkpoint metadata is not valid JSON") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"not a {FORMAT} checkpoint (metadata format={meta.get('format')!r})")
    kind = meta.get("kind")
    if kind not in _KINDS:
        raise CheckpointError(f"unknown checkpoint kind {kind!r}; known: {sorted(_KINDS)}")
    cls, from_dict = _KINDS[kind]
    model = cls(from_dict(json.loads(meta["config"])))
    strict_load(model, load(data), what=f"native {kind} checkpoint")
    return model, json.loads(meta.get("extra", "{}"))


def save_native(model: nn.Module, path: str | Path, extra: dict[str, Any] | None = None) -> None:
    Path(path).write_bytes(to_bytes(model, extra))


def load_native(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    return from_bytes(Path(path).read_bytes())


TRAIN_STATE_FORMAT = "taming-pipeline-train-state"


def training_state_to_bytes(state: dict[str, Any]) -> bytes:
    """A training run's resumable state (tensors, optimizer states, ints, floats, strings) as bytes."""
    import io

    buf = io.BytesIO()
    torch.save({"format": TRAIN_STATE_FORMAT, "format_version": FORMAT_VERSION, "state": state}, buf)
    return buf.getvalue()


def training_state_from_bytes(data: bytes, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The state :func:`training_state_to_bytes` wrote; :class:`CheckpointError` for anything else."""
    import io

    try:
        obj = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated files, pickles beyond tensors, ...
        raise CheckpointError(f"not a readable training state: {str(e).splitlines()[0]}") from None
    if not isinstance(obj, dict) or obj.get("format") != TRAIN_STATE_FORMAT:
        raise CheckpointError(f"not a {TRAIN_STATE_FORMAT} file")
    return obj["state"]


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


# --------------------------------------------------------------------------- official taming releases

_FIRST_STAGES = {
    "taming.models.vqgan.VQModel": "vq",
    "taming.models.vqgan.GumbelVQ": "gumbel",
    "taming.models.vqgan.VQSegmentationModel": "segmentation",
}


@dataclass
class TamingImport:
    model: VQGAN | Net2Net  # a first stage, or a whole Net2NetTransformer
    loss: VQGANLoss | None  # first stages with with_loss=True
    global_step: int | None
    target: str


def resolve_release(path: str | Path, config_path: str | Path | None = None) -> tuple[Path, Path]:
    """(ckpt, yaml) of a release folder or of a ckpt file with its yaml beside or in ../configs/."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"taming checkpoint {path} does not exist")
    if path.is_dir():
        candidates = [
            path / "checkpoints" / "last.ckpt",
            path / "last.ckpt",
            *sorted(path.glob("checkpoints/*.ckpt")),
        ]
        ckpt = next((c for c in candidates if c.is_file()), None)
        if ckpt is None:
            raise FileNotFoundError(f"no checkpoint in {path} (looked for checkpoints/last.ckpt and *.ckpt)")
    else:
        ckpt = path
    if config_path is not None:
        cfg = Path(config_path)
    else:
        options = [
            ckpt.parent / "model.yaml",
            ckpt.parent.parent / "configs" / "model.yaml",
            *sorted((ckpt.parent.parent / "configs").glob("*.yaml")),
            *sorted(ckpt.parent.glob("*.yaml")),
        ]
        cfg = next((c for c in options if c.is_file()), None)
        if cfg is None:
            raise FileNotFoundError(
                f"no model.yaml for {ckpt}: expected configs/model.yaml beside checkpoints/, "
                "or pass config_path"
            )
    if not cfg.is_file():
        raise FileNotFoundError(f"taming config {cfg} does not exist")
    return ckpt, cfg


def load_lightning_state(
    ckpt: Path, allow_pickle: bool = False
) -> tuple[dict[str, torch.Tensor], int | None]:
    try:
        data = torch.load(ckpt, map_location="cpu", weights_only=not allow_pickle)
    except Exception as e:  # noqa: BLE001 - pickle.UnpicklingError and friends
        if allow_pickle:
            raise
        raise CheckpointError(
            f"{ckpt} holds pickled Python objects beyond tensors; refusing to unpickle it "
            f"(pass allow_pickle=True only for a file you trust). Loader said: {str(e).splitlines()[0]}"
        ) from None
    if not isinstance(data, dict) or "state_dict" not in data:
        raise CheckpointError(f"{ckpt} is not a Lightning checkpoint (no 'state_dict')")
    return data["state_dict"], data.get("global_step")


def vqgan_config_from_taming(target: str, params: dict[str, Any]) -> VQGANConfig:
    kind = _FIRST_STAGES.get(target)
    if kind is None:
        raise CheckpointError(
            f"unsupported first-stage target {target!r}; supported: {sorted(_FIRST_STAGES)}"
        )
    if params.get("remap"):
        raise CheckpointError("index remapping (params.remap) is not supported; re-export without it")
    dd = params["ddconfig"]
    if dd.get("double_z", False):
        raise CheckpointError("ddconfig.double_z=true is a KL autoencoder, not a VQGAN")
    if kind == "gumbel":
        quantizer = QuantizerConfig(kind="gumbel", kl_weight=float(params.get("kl_weight", 1e-8)))
    else:
        quantizer = QuantizerConfig(kind="vq", beta=0.25, legacy_loss=True)
    return VQGANConfig(
        in_channels=dd["in_channels"],
        out_channels=dd["out_ch"],
        ch=dd["ch"],
        ch_mult=tuple(dd["ch_mult"]),
        num_res_blocks=dd["num_res_blocks"],
        attn_resolutions=tuple(dd["attn_resolutions"]),
        resolution=dd["resolution"],
        z_channels=dd["z_channels"],
        dropout=float(dd.get("dropout", 0.0)),
        embed_dim=params["embed_dim"],
        codebook_size=params["n_embed"],
        quantizer=quantizer,
        segmentation_labels=params.get("n_labels") if kind == "segmentation" else None,
    )


def loss_config_from_taming(lossconfig: dict[str, Any]) -> VQGANLossConfig:
    target = lossconfig.get("target", "")
    if not target.endswith("VQLPIPSWithDiscriminator"):
        raise CheckpointError(f"loss {target!r} cannot be imported (only VQLPIPSWithDiscriminator)")
    p = lossconfig.get("params", {})
    if p.get("disc_conditional") or p.get("use_actnorm"):
        raise CheckpointError("conditional discriminators and ActNorm are not supported")
    return VQGANLossConfig(
        disc_start=p["disc_start"],
        codebook_weight=p.get("codebook_weight", 1.0),
        pixel_weight=p.get("pixelloss_weight", 1.0),
        perceptual_weight=p.get("perceptual_weight", 1.0),
        disc_weight=p.get("disc_weight", 1.0),
        disc_factor=p.get("disc_factor", 1.0),
        disc_loss=p.get("disc_loss", "hinge"),
        disc_num_layers=p.get("disc_num_layers", 3),
        disc_in_channels=p.get("disc_in_channels", 3),
        disc_ndf=p.get("disc_ndf", 64),
    )


def build_first_stage(
    target: str, params: dict[str, Any], state: dict[str, torch.Tensor], what: str
) -> VQGAN:
    """Our VQGAN from an official first stage's config and its (``loss.``-free) weights."""
    cfg = vqgan_config_from_taming(target, params)
    state = dict(state)
    if "colorize" in state and cfg.segmentation_labels is None:
        state.pop("colorize")  # a VQModel's visualisation-only random projection
    model = VQGAN(cfg)
    strict_load(model, state, what)
    return model.eval()


def load_taming(
    path: str | Path,
    config_path: str | Path | None = None,
    with_loss: bool = False,
    allow_pickle: bool = False,
) -> TamingImport:
    """Import an official release: a first stage (VQGAN) or a Net2NetTransformer (``.model``)."""
    ckpt, cfg_path = resolve_release(path, config_path)
    model_cfg = yaml.safe_load(cfg_path.read_text())["model"]
    target, params = model_cfg["target"], model_cfg["params"]
    if target == _TRANSFORMER:
        if with_loss:
            raise CheckpointError(
                "with_loss applies to first stages; transformer releases carry no VQGAN loss"
            )
        net, step = _load_transformer(ckpt, params, allow_pickle)
        return TamingImport(net, None, step, target)
    if target not in _FIRST_STAGES:
        raise CheckpointError(
            f"{cfg_path}: unsupported target {target!r}; supported: {sorted([*_FIRST_STAGES, _TRANSFORMER])}"
        )
    state, step = load_lightning_state(ckpt, allow_pickle)
    model_state = {k: v for k, v in state.items() if not k.startswith("loss.")}
    model = build_first_stage(target, params, model_state, f"{ckpt}")
    loss = None
    if with_loss:
        loss_cfg = loss_config_from_taming(params["lossconfig"])
        loss_state = {k[5:]: v for k, v in state.items() if k.startswith("loss.")}
        if not loss_state:
            raise CheckpointError(f"{ckpt} holds no loss.* weights to import")
        loss = VQGANLoss(loss_cfg, require_trunk=False)
        for k, v in loss.state_dict().items():
            if k.endswith("num_batches_tracked") and k not in loss_state:
                loss_state[k] = v  # BatchNorm counters may or may not be in releases
            if ".lins." in k:  # the lpips package's ModuleList alias of the heads lin0..lin4
                i = k.split(".lins.")[1].split(".")[0]
                src = k.replace(f".lins.{i}.", f".lin{i}.")
                if src in loss_state:
                    loss_state[k] = loss_state[src]
        strict_load(loss, loss_state, f"{ckpt} (loss.*)")
    return TamingImport(model, loss, step, target)


# --------------------------------------------------------------------------- official transformers

_TRANSFORMER = "taming.models.cond_transformer.Net2NetTransformer"


def condition_from_taming(params: dict[str, Any]) -> tuple[ConditionConfig, dict[str, Any] | None]:
    """The condition mode of a Net2NetTransformer config, and the condition VQGAN's config if any."""
    cond = params.get("cond_stage_config")
    if params.get("unconditional") or cond == "__is_unconditional__":
        return ConditionConfig(mode="unconditional", sos_token=int(params.get("sos_token", 0))), None
    if cond == "__is_first_stage__":
        raise CheckpointError("cond_stage_config __is_first_stage__ is not supported")
    target = cond.get("target", "")
    if target.endswith("Labelator"):
        return ConditionConfig(mode="class", n_classes=int(cond["params"]["n_classes"])), None
    if target.endswith("CoordStage"):
        p = cond["params"]
        return ConditionConfig(
            mode="coord", coord_levels=int(p["n_embed"]), coord_down=int(p["down_factor"])
        ), None
    if target in _FIRST_STAGES:
        return ConditionConfig(mode="spatial"), cond
    raise CheckpointError(f"condition stage {target!r} cannot be imported")


def load_taming_transformer(
    path: str | Path, config_path: str | Path | None = None, allow_pickle: bool = False
) -> Net2Net:
    """An official ``Net2NetTransformer`` release -> our :class:`~models.net2net.Net2Net`."""
    imported = load_taming(path, config_path, allow_pickle=allow_pickle)
    if not isinstance(imported.model, Net2Net):
        raise CheckpointError(f"{path} is a first stage ({imported.target}), not {_TRANSFORMER}")
    return imported.model


def _load_transformer(ckpt: Path, params: dict[str, Any], allow_pickle: bool) -> tuple[Net2Net, int | None]:
    if params.get("permuter_config") and not params["permuter_config"]["target"].endswith("Identity"):
        raise CheckpointError("only the identity permuter (raster order) is supported")
    if params.get("downsample_cond_size", -1) != -1:
        raise CheckpointError("downsample_cond_size is not supported")
    tcfg = params["transformer_config"]
    if not tcfg["target"].endswith("mingpt.GPT"):
        raise CheckpointError(f"transformer {tcfg['target']!r} cannot be imported (only minGPT's GPT)")
    gpt_cfg = GPTConfig(**{k: v for k, v in tcfg["params"].items() if k in GPTConfig.__dataclass_fields__})
    unknown = set(tcfg["params"]) - set(GPTConfig.__dataclass_fields__)
    if unknown:
        raise CheckpointError(f"transformer options {sorted(unknown)} are not supported")
    cond, cond_stage_cfg = condition_from_taming(params)
    state, step = load_lightning_state(ckpt, allow_pickle)

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}

    known = ("first_stage_model.", "cond_stage_model.", "transformer.")
    stray = sorted(k for k in state if not k.startswith(known))
    if stray:
        raise CheckpointError(f"{ckpt}: unexpected keys {stray[:8]}")
    fs = params["first_stage_config"]
    first = build_first_stage(
        fs["target"], fs["params"], _no_loss(part("first_stage_model.")), f"{ckpt} first stage"
    )
    cond_stage = None
    if cond_stage_cfg is not None:
        cs_state = _no_loss(part("cond_stage_model."))
        cond_stage = build_first_stage(
            cond_stage_cfg["target"], cond_stage_cfg["params"], cs_state, f"{ckpt} condition stage"
        )
    elif part("cond_stage_model."):
        raise CheckpointError(f"{ckpt}: cond_stage_model weights but a weightless condition ({cond.mode})")
    gpt = GPT(gpt_cfg)
    tstate = {k: v for k, v in part("transformer.").items() if not k.endswith("attn.mask")}
    strict_load(gpt, tstate, f"{ckpt} transformer")
    return Net2Net(first, gpt.eval(), cond, cond_stage).eval(), step


def _no_loss(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith("loss.")}


# --------------------------------------------------------------------------- preprocessing models


def _plain_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A release file holding a plain state_dict, or one wrapped as {"model": ...} / {"state_dict": ...}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path} cannot be read without unpickling Python objects: {e}") from None
    for key in ("model", "state_dict"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a state_dict")
    return data


def load_deeplab_v2(path: str | Path, cfg: DeepLabConfig | None = None) -> DeepLabMSC:
    """The official ``deeplabv2_resnet101_msc-cocostuff164k-100000.pth`` (kazuto1011/deeplab-pytorch)."""
    model = DeepLabMSC(cfg)
    state = _plain_state(path)
    for k, v in model.state_dict().items():  # BatchNorm counters may or may not be in the release
        if k.endswith("num_batches_tracked"):
            state.setdefault(k, v)
    strict_load(model, state, f"{path}")
    return model.eval()


MIDAS_MODELS = {
    "midas_v21_small_256": MidasSmall,
    "midas_v21_384": MidasNet,
    "dpt_hybrid_384": lambda: DPTDepth("dpt_hybrid_384"),
    "dpt_large_384": lambda: DPTDepth("dpt_large_384"),
}


def load_midas(path: str | Path, name: str = "midas_v21_small_256") -> MidasSmall | MidasNet | DPTDepth:
    """An official MiDaS release file (plain state_dict or a {"model": ...} wrapper), loaded strictly."""
    if name not in MIDAS_MODELS:
        raise CheckpointError(f"unknown MiDaS model {name!r}; supported: {sorted(MIDAS_MODELS)}")
    model = MIDAS_MODELS[name]()
    state = _plain_state(path)
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked"):
            state.setdefault(k, v)
    strict_load(model, state, f"{path}")
    return model.eval()


def load_midas_small(path: str | Path) -> MidasSmall:
    return load_midas(path, "midas_v21_small_256")


def load_deeplab_v3_torchvision(path: str | Path) -> nn.Module:
    """torchvision's ``deeplabv3_resnet101_coco-586e9e4e.pth`` (its weights enum's file), loaded strictly."""
    from models.deeplab import torchvision_deeplabv3

    model = torchvision_deeplabv3()
    strict_load(model, _plain_state(path), f"{path}")
    return model.eval()
