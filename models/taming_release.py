"""Official taming releases, imported into our models: first stages and whole transformers.

``load_taming(path)`` imports the folder a user downloads from the official release
(``checkpoints/last.ckpt`` beside ``configs/``, a Lightning checkpoint and its model config) or the
``.ckpt`` file inside it. ``VQModel``, ``GumbelVQ`` and ``VQSegmentationModel`` become our
:class:`~models.vqgan.VQGAN`; with ``with_loss=True`` the ``loss.*`` weights (LPIPS + discriminator)
go into our :class:`~models.losses.VQGANLoss`; a ``Net2NetTransformer`` becomes
:class:`~models.net2net.Net2Net` (first stage, condition and GPT). Anything we cannot represent is a
:class:`~models.checkpoint.CheckpointError`, and so is a missing key or a shape mismatch: never a
silent partial load. ``torch.load`` runs with ``weights_only=True``; a file that needs arbitrary
unpickling is refused unless ``allow_pickle``.

The config a release declares is read, never guessed: ``configs/model.yaml``, or the one
``configs/*-project.yaml`` taming's training writes; two candidates are an error that asks for
``config_path``. :func:`read_release` reads it without the weights (a plan's check).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from models.checkpoint import CheckpointError, strict_load
from models.gpt import GPT, GPTConfig
from models.losses import VQGANLoss, VQGANLossConfig
from models.net2net import ConditionConfig, Net2Net
from models.quantize import QuantizerConfig
from models.vqgan import VQGAN, VQGANConfig

TRANSFORMER = "taming.models.cond_transformer.Net2NetTransformer"
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
    """(ckpt, yaml) of a release: its folder (``checkpoints/last.ckpt``) or the ckpt file, and the
    config it declares (``configs/model.yaml`` or the one ``configs/*-project.yaml``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"taming checkpoint {path} does not exist")
    ckpt = path / "checkpoints" / "last.ckpt" if path.is_dir() else path
    if not ckpt.is_file():
        raise FileNotFoundError(f"no checkpoint in {path}: a release folder holds checkpoints/last.ckpt")
    if config_path is not None:
        cfg = Path(config_path)
        if not cfg.is_file():
            raise FileNotFoundError(f"taming config {cfg} does not exist")
        return ckpt, cfg
    configs = ckpt.parent.parent / "configs"
    declared = [configs / "model.yaml"] if (configs / "model.yaml").is_file() else []
    declared = declared or sorted(configs.glob("*-project.yaml"))
    if len(declared) != 1:
        found = f"found {[d.name for d in declared]}" if declared else "found none"
        raise FileNotFoundError(
            f"the config of {ckpt}: expected configs/model.yaml or one configs/*-project.yaml beside "
            f"checkpoints/ ({found}); pass config_path"
        )
    return ckpt, declared[0]


@dataclass(frozen=True)
class Release:
    """What a release declares, read without its weights: the model class and its parameters."""

    ckpt: Path
    config_path: Path
    target: str  # e.g. taming.models.vqgan.VQModel
    params: dict[str, Any]

    @property
    def is_transformer(self) -> bool:
        return self.target == TRANSFORMER

    def first_stage_config(self) -> VQGANConfig:
        """The VQGAN of a first-stage release, or a transformer release's first stage."""
        if self.is_transformer:
            return self.transformer().first_stage
        return vqgan_config_from_taming(self.target, self.params)

    def transformer(self) -> TransformerSpec:
        """A transformer release's architecture (:class:`CheckpointError` for a first stage)."""
        if not self.is_transformer:
            raise CheckpointError(f"{self.ckpt} is a first stage ({self.target}), not {TRANSFORMER}")
        return transformer_spec(self.params)


def read_release(path: str | Path, config_path: str | Path | None = None) -> Release:
    """A release's declared model (:class:`Release`), its weights not read."""
    ckpt, cfg_path = resolve_release(path, config_path)
    model_cfg = (yaml.safe_load(cfg_path.read_text()) or {}).get("model") or {}
    if "target" not in model_cfg:
        raise CheckpointError(f"{cfg_path}: no model.target (not a taming model config)")
    target = model_cfg["target"]
    if target != TRANSFORMER and target not in _FIRST_STAGES:
        raise CheckpointError(
            f"{cfg_path}: unsupported target {target!r}; supported: {sorted([*_FIRST_STAGES, TRANSFORMER])}"
        )
    return Release(ckpt, cfg_path, target, model_cfg.get("params") or {})


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
    release = read_release(path, config_path)
    ckpt, target, params = release.ckpt, release.target, release.params
    if release.is_transformer:
        if with_loss:
            raise CheckpointError(
                "with_loss applies to first stages; transformer releases carry no VQGAN loss"
            )
        net, step = _load_transformer(ckpt, params, allow_pickle)
        return TamingImport(net, None, step, target)
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


@dataclass(frozen=True)
class TransformerSpec:
    """A ``Net2NetTransformer`` release's architecture: the GPT, the condition, the condition stage."""

    gpt: GPTConfig
    condition: ConditionConfig
    first_stage: VQGANConfig
    cond_stage: VQGANConfig | None  # spatial conditions: the condition VQGAN

    @property
    def grid(self) -> tuple[int, int]:
        side = self.first_stage.resolution // self.first_stage.downsample_factor
        return side, side

    @property
    def prefix_length(self) -> int:
        """Condition tokens: the condition stage's code grid, the coordinate grid, or one."""
        if self.cond_stage is not None:
            return (self.cond_stage.resolution // self.cond_stage.downsample_factor) ** 2
        return self.grid[0] * self.grid[1] if self.condition.mode == "coord" else 1


def transformer_spec(params: dict[str, Any]) -> TransformerSpec:
    """The architecture a ``Net2NetTransformer`` config declares (what we can import of it)."""
    if params.get("permuter_config") and not params["permuter_config"]["target"].endswith("Identity"):
        raise CheckpointError("only the identity permuter (raster order) is supported")
    if params.get("downsample_cond_size", -1) != -1:
        raise CheckpointError("downsample_cond_size is not supported")
    tcfg = params["transformer_config"]
    if not tcfg["target"].endswith("mingpt.GPT"):
        raise CheckpointError(f"transformer {tcfg['target']!r} cannot be imported (only minGPT's GPT)")
    unknown = set(tcfg["params"]) - set(GPTConfig.__dataclass_fields__)
    if unknown:
        raise CheckpointError(f"transformer options {sorted(unknown)} are not supported")
    cond, cond_stage_cfg = condition_from_taming(params)
    fs = params["first_stage_config"]
    cond_stage = None
    if cond_stage_cfg is not None:
        cond_stage = vqgan_config_from_taming(cond_stage_cfg["target"], cond_stage_cfg["params"])
    return TransformerSpec(
        GPTConfig(**tcfg["params"]), cond, vqgan_config_from_taming(fs["target"], fs["params"]), cond_stage
    )


def _load_transformer(ckpt: Path, params: dict[str, Any], allow_pickle: bool) -> tuple[Net2Net, int | None]:
    spec = transformer_spec(params)
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
    if spec.cond_stage is not None:
        cs = params["cond_stage_config"]
        cs_state = _no_loss(part("cond_stage_model."))
        cond_stage = build_first_stage(cs["target"], cs["params"], cs_state, f"{ckpt} condition stage")
    elif part("cond_stage_model."):
        raise CheckpointError(
            f"{ckpt}: cond_stage_model weights but a weightless condition ({spec.condition.mode})"
        )
    gpt = GPT(spec.gpt)
    tstate = {k: v for k, v in part("transformer.").items() if not k.endswith("attn.mask")}
    strict_load(gpt, tstate, f"{ckpt} transformer")
    return Net2Net(first, gpt.eval(), spec.condition, cond_stage).eval(), step


def _no_loss(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith("loss.")}
