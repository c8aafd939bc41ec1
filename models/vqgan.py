"""VQGAN: the convolutional first stage of *Taming Transformers for High-Resolution Image Synthesis*
(Esser, Rombach, Ommer, CVPR 2021).

Encoder and decoder follow the official taming architecture exactly, with the same state_dict
names (``encoder.down.{i}.block.{j}``, ``mid.block_1/attn_1/block_2``, ``nin_shortcut``,
``q/k/v/proj_out``, level-indexed ``decoder.up.{i}``, ``quant_conv``, ``post_quant_conv``,
``quantize.embedding.weight``), so official checkpoints load strictly: the asymmetric (0,1,0,1)
padding before each strided conv, GroupNorm(32, eps=1e-6), swish, no output clamp. The networks are
fully convolutional: non-square inputs work.

API (LlamaGen-style tokenizer): ``encode(x) -> (quant, qloss, codes)`` with codes (B, h, w),
``decode(quant)``, ``decode_codes(codes)``, ``VQGAN.from_config(cfg)``; presets in ``PRESETS``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from models.quantize import GumbelQuantizer, QuantizerConfig, VectorQuantizer


@dataclass(frozen=True)
class VQGANConfig:
    in_channels: int = 3  # image channels (1 for depth, n_labels for one-hot segmentation)
    out_channels: int = 3
    ch: int = 128  # base width; level i has ch * ch_mult[i] channels
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # len(ch_mult) - 1 downsamplings: f = 2 ** (len - 1)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)  # feature-map sides (of `resolution`) that get attention
    resolution: int = 256  # the training side length; only decides where attention blocks sit
    z_channels: int = 256
    dropout: float = 0.0
    embed_dim: int = 256  # code vector size (LlamaGen: 8, with l2-normalised codes)
    codebook_size: int = 1024
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    segmentation_labels: int | None = None  # one-hot segmentation model: keeps taming's `colorize`

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


PRESETS: dict[str, VQGANConfig] = {
    # taming's ImageNet f16 models (vqgan_imagenet_f16_1024 / _16384)
    "f16-1024": VQGANConfig(),
    "f16-16384": VQGANConfig(codebook_size=16384),
    # taming's best first stage: GumbelVQ f8, 8192 codes (OpenImages)
    "gumbel-f8-8192": VQGANConfig(
        ch_mult=(1, 1, 2, 4),
        attn_resolutions=(32,),
        z_channels=256,
        embed_dim=256,
        codebook_size=8192,
        quantizer=QuantizerConfig(kind="gumbel", kl_weight=1e-8),
    ),
    # LlamaGen-style f16: 8-dim l2-normalised codes, 16384 entries
    "f16-16384-l2": VQGANConfig(
        embed_dim=8, codebook_size=16384, quantizer=QuantizerConfig(l2_norm=True, legacy_loss=False)
    ),
    # small models for 32x32 data (the demo's Fashion-MNIST); f4 = 8x8 codes
    "f4-small": VQGANConfig(
        in_channels=1,
        out_channels=1,
        ch=32,
        ch_mult=(1, 2, 2),
        num_res_blocks=1,
        attn_resolutions=(),
        resolution=32,
        z_channels=32,
        embed_dim=8,
        codebook_size=512,
        quantizer=QuantizerConfig(l2_norm=True, legacy_loss=False),
    ),
}


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def Normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions of a feature map."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        q, k, v = (
            t.reshape(b, c, h * w).transpose(1, 2) for t in (self.q(hn), self.k(hn), self.v(hn))
        )  # (B, HW, C)
        out = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # torch convs have no asymmetric padding


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(blocks: list[nn.Module], attns: list[nn.Module]) -> nn.Module:
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    level.attn = nn.ModuleList(attns)
    return level


def _mid(channels: int, dropout: float) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, dropout)
    mid.attn_1 = AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels, channels, dropout)
    return mid


class Encoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        ch, mult = cfg.ch, (1, *cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        res = cfg.resolution
        self.down = nn.ModuleList()
        for i in range(len(cfg.ch_mult)):
            block_in, block_out = ch * mult[i], ch * mult[i + 1]
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, cfg.dropout))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(block_in))
            level = _level(blocks, attns)
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(block_in)
                res //= 2
            self.down.append(level)
        self.mid = _mid(block_in, cfg.dropout)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(swish(self.norm_out(h)))  # (B, z_channels, H/f, W/f)


class Decoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        ch, n = cfg.ch, len(cfg.ch_mult)
        block_in = ch * cfg.ch_mult[-1]
        res = cfg.resolution // 2 ** (n - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in, cfg.dropout)
        levels: list[nn.Module] = []
        for i in reversed(range(n)):
            block_out = ch * cfg.ch_mult[i]
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, cfg.dropout))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(block_in))
            level = _level(blocks, attns)
            if i != 0:
                level.upsample = Upsample(block_in)
                res *= 2
            levels.insert(0, level)  # indexed by resolution level, as in the official code
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))  # (B, out_channels, H, W), unclamped


class VQGAN(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        q = cfg.quantizer
        if q.kind == "gumbel":
            if cfg.z_channels != cfg.embed_dim:  # the official proj is sized by z_channels
                raise ValueError("a gumbel quantizer needs z_channels == embed_dim")
            self.quantize: nn.Module = GumbelQuantizer(cfg.z_channels, cfg.codebook_size, cfg.embed_dim, q)
        else:
            self.quantize = VectorQuantizer(cfg.codebook_size, cfg.embed_dim, q)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        if cfg.segmentation_labels:  # taming's random projection for viewing one-hot maps as RGB
            self.register_buffer("colorize", torch.randn(3, cfg.segmentation_labels, 1, 1))

    @classmethod
    def from_config(cls, cfg: VQGANConfig | str | dict) -> VQGAN:
        if isinstance(cfg, str):
            if cfg not in PRESETS:
                raise KeyError(f"unknown VQGAN preset {cfg!r}; known: {sorted(PRESETS)}")
            cfg = PRESETS[cfg]
        elif isinstance(cfg, dict):
            cfg = config_from_dict(cfg)
        return cls(cfg)

    def encode_pre_quant(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))  # (B, embed_dim, h, w)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) in [-1, 1] -> quant (B, embed_dim, h, w), qloss (), codes (B, h, w)."""
        out = self.quantize(self.encode_pre_quant(x))
        return out.quant, out.loss, out.codes

    def encode_with_stats(self, x: torch.Tensor):
        """Like :meth:`encode`, returning the quantizer's full output (usage statistics included)."""
        return self.quantize(self.encode_pre_quant(x))

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quant))

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) -> images (B, C, h*f, w*f)."""
        return self.decode(self.quantize.embed_codes(codes))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        quant, qloss, _ = self.encode(x)
        return self.decode(quant), qloss

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's last weight: the adaptive GAN weight balances gradients here."""
        return self.decoder.conv_out.weight


def preset(
    name: str,
    *,
    channels: int,
    codebook_size: int | None = None,
    resolution: int | None = None,
    dead_code_threshold: float | None = None,
    segmentation: bool = False,
) -> VQGANConfig:
    """Preset ``name`` for ``channels`` in/out channels (one-hot labels with ``segmentation``), with
    its codebook size, training resolution and dead-code threshold overridden where given."""
    if name not in PRESETS:
        raise KeyError(f"unknown VQGAN preset {name!r}; known: {sorted(PRESETS)}")
    base = PRESETS[name]
    q = base.quantizer
    if dead_code_threshold is not None:
        q = dataclasses.replace(q, dead_code_threshold=dead_code_threshold)
    return dataclasses.replace(
        base,
        in_channels=channels,
        out_channels=channels,
        resolution=resolution or base.resolution,
        quantizer=q,
        codebook_size=codebook_size or base.codebook_size,
        segmentation_labels=channels if segmentation else None,
    )


def config_from_dict(d: dict) -> VQGANConfig:
    d = dict(d)
    d["quantizer"] = QuantizerConfig(**d.get("quantizer", {}))
    for k in ("ch_mult", "attn_resolutions"):
        if k in d:
            d[k] = tuple(d[k])
    return VQGANConfig(**d)


def config_to_dict(cfg: VQGANConfig) -> dict:
    return dataclasses.asdict(cfg)


def encode_batches(model: VQGAN, x, batch_size: int, device, dtype, segmentation: bool = False):
    """Codes (N, h, w) int64 numpy of compact arrays ``x`` (N, C, H, W): images in [-1, 1] (float
    or a view of NHWC memory), or, with ``segmentation``, uint8 label ids (N, 1, H, W) that become
    one-hot maps of the model's input channels. Batches of ``batch_size`` in channels-last memory
    (no copy for NHWC views): the convolutions run ~20% faster than on NCHW on CPU
    (tests/bench/bench_tokenize.py)."""
    import numpy as np

    if not len(x):
        return np.zeros((0, 1, 1), np.int64)
    codes = []
    with torch.inference_mode():
        for lo in range(0, len(x), batch_size):
            nhwc = np.ascontiguousarray(x[lo : lo + batch_size].transpose(0, 2, 3, 1))
            batch = torch.from_numpy(nhwc).permute(0, 3, 1, 2).to(device)
            if segmentation:
                labels = batch[:, 0].long()
                if labels.numel() and int(labels.max()) >= model.config.in_channels:
                    raise ValueError(
                        f"label {int(labels.max())} does not fit the tokenizer's "
                        f"{model.config.in_channels} segmentation classes"
                    )
                batch = F.one_hot(labels, model.config.in_channels).permute(0, 3, 1, 2)
            batch = batch.to(dtype).contiguous(memory_format=torch.channels_last)
            codes.append(model.encode(batch)[2].cpu().numpy())
    return np.concatenate(codes)
