"""The two-stage model: a VQGAN tokenizer, an optional condition encoder and the GPT over codes,
as taming's ``Net2NetTransformer`` (the paper's four conditioning modes).

The condition becomes a token prefix:
- ``unconditional``: one SOS token;
- ``class``: the class id as one token;
- ``spatial``: the codes of a second VQGAN (depth, segmentation), ``h*w`` tokens;
- ``coord``: taming's ``CoordStage`` (FacesHQ): a [0, 1] coordinate map area-downsampled by
  ``coord_down`` and quantised to ``coord_levels`` levels.
In compat mode condition and image ids share one vocabulary with no offset, so official weights
work; native models may set ``token_offset`` (recorded in their checkpoint). The loss covers image
positions only. ``null_token`` enables classifier-free guidance (condition dropout in training,
batch doubling at sampling).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from models.gpt import GPT
from models.token_sampling import Generators
from models.vqgan import VQGAN


@dataclass(frozen=True)
class ConditionConfig:
    mode: Literal["unconditional", "class", "spatial", "coord"] = "unconditional"
    sos_token: int = 0  # unconditional: the single prefix token
    n_classes: int = 0  # class: number of classes
    coord_levels: int = 0  # coord: quantisation levels (taming's CoordStage n_embed)
    coord_down: int = 16  # coord: downsampling factor
    token_offset: int = 0  # added to condition ids (0 = the official shared vocabulary)
    null_token: int | None = None  # classifier-free guidance: the token of "no condition"
    cond_dropout: float = 0.0  # training: share of samples whose condition becomes null_token (CFG)
    cond_codebook_size: int = 0  # spatial: the condition tokenizer's codebook size


def condition_vocab(c: ConditionConfig) -> int:
    """How many condition token ids the mode uses (before ``token_offset``; null token excluded)."""
    return {
        "unconditional": c.sos_token + 1,
        "class": c.n_classes,
        "spatial": c.cond_codebook_size,
        "coord": c.coord_levels + 1,
    }[c.mode]


def native_condition(
    mode: str, codebook_size: int, cond_dropout: float = 0.0, **fields
) -> tuple[ConditionConfig, int]:
    """The condition layout of a native model: image codes take ids ``[0, codebook_size)``, the
    condition's ids follow (no sharing, unlike the official vocabulary), then the null token when
    ``cond_dropout`` > 0. Returns the config and the vocabulary size it needs."""
    c = ConditionConfig(mode=mode, token_offset=codebook_size, **fields)
    n = codebook_size + condition_vocab(c)
    if cond_dropout > 0 and mode != "unconditional":
        return dataclasses.replace(c, null_token=n, cond_dropout=cond_dropout), n + 1
    return c, n


def condition_prefix(c: ConditionConfig, raw: torch.Tensor) -> torch.Tensor:
    """Raw condition ids -> the token prefix (B, Lc): the class id (B,), condition codes or
    coordinate levels (B, Lc); unconditional: any (B, ...) tensor, one SOS token per row."""
    if c.mode == "unconditional":
        return torch.full(
            (raw.shape[0], 1), c.sos_token + c.token_offset, dtype=torch.long, device=raw.device
        )
    tokens = raw.long().reshape(raw.shape[0], -1)
    n = condition_vocab(c)
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= n):
        raise ValueError(
            f"{c.mode} condition ids must lie in [0, {n}), got [{int(tokens.min())}, {int(tokens.max())}]"
        )
    return tokens + c.token_offset


def drop_condition(c: ConditionConfig, tokens: torch.Tensor, generator=None) -> torch.Tensor:
    """Training: the prefix of a share ``cond_dropout`` of the rows replaced by the null token (CFG)."""
    if c.cond_dropout <= 0:
        return tokens
    if c.null_token is None:
        raise ValueError("cond_dropout needs a null_token")
    drop = (
        torch.rand(tokens.shape[0], 1, generator=generator, device="cpu").to(tokens.device) < c.cond_dropout
    )
    return torch.where(drop, torch.full_like(tokens, c.null_token), tokens)


def coord_levels_map(
    grid: tuple[int, int],
    side: tuple[int, int],
    offset: tuple[int, int],
    crop: int,
    levels: int,
    flip: bool = False,
) -> torch.Tensor:
    """taming's coordinate condition for one code grid: the map ``(y * W + x) / (H * W)`` of the
    full image (H, W), area-averaged over each code cell of the crop at ``offset`` (pixels) and
    quantised to ``levels`` (as ``CoordStage``), flattened (h * w,). ``flip``: a mirrored view."""
    (h, w), (H, W), (r, q) = grid, side, offset
    f = crop / h
    y = r + (torch.arange(h, dtype=torch.float64) + 0.5) * f - 0.5
    x = q + (torch.arange(w, dtype=torch.float64) + 0.5) * f - 0.5
    if flip:
        x = x.flip(0)
    value = (y[:, None] * W + x[None, :]) / (H * W)
    return (levels * value.clamp(0, 1)).round().long().reshape(-1)


class Net2Net(nn.Module):
    def __init__(
        self, first_stage: VQGAN, transformer: GPT, cond: ConditionConfig, cond_stage: VQGAN | None = None
    ):
        super().__init__()
        if cond.mode == "spatial" and cond_stage is None:
            raise ValueError("spatial conditioning needs a condition VQGAN")
        self.first_stage, self.transformer, self.cond, self.cond_stage = (
            first_stage,
            transformer,
            cond,
            cond_stage,
        )

    @torch.no_grad()
    def encode_to_z(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> image codes (B, h*w) in raster order."""
        return self.first_stage.encode(x)[2].reshape(x.shape[0], -1)

    @torch.no_grad()
    def encode_to_c(self, c: torch.Tensor) -> torch.Tensor:
        """The condition -> its token prefix (B, Lc)."""
        m = self.cond
        if m.mode == "unconditional":
            tokens = torch.full((c.shape[0], 1), m.sos_token, dtype=torch.long, device=c.device)
        elif m.mode == "class":
            tokens = c.long().reshape(-1, 1)
        elif m.mode == "spatial":
            tokens = self.cond_stage.encode(c)[2].reshape(c.shape[0], -1)
        else:
            if c.min() < 0 or c.max() > 1:
                raise ValueError("coordinate maps must lie in [0, 1]")
            small = F.interpolate(c, scale_factor=1 / m.coord_down, mode="area").clamp(0, 1)
            tokens = (m.coord_levels * small).round().long().reshape(c.shape[0], -1)
        return tokens + m.token_offset

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training forward: logits over image positions (B, h*w, V) and their targets (B, h*w)."""
        z = self.encode_to_z(x)
        c_tokens = self.encode_to_c(c)
        if self.training:
            c_tokens = drop_condition(self.cond, c_tokens)
        logits = self.transformer(torch.cat([c_tokens, z], 1)[:, :-1])
        return logits[:, c_tokens.shape[1] - 1 :], z

    def loss(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        logits, target = self(x, c)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))

    @torch.no_grad()
    def sample_codes(
        self,
        c_tokens: torch.Tensor,
        steps: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        cfg_scale: float | None = None,
        generator: Generators = None,
    ) -> torch.Tensor:
        """Condition tokens (B, Lc) -> ``steps`` image codes (B, steps)."""
        uncond = None
        if cfg_scale is not None:
            if self.cond.null_token is None:
                raise ValueError("this model was not trained with a null condition (no null_token)")
            uncond = torch.full_like(c_tokens, self.cond.null_token)
        seq = self.transformer.generate(
            c_tokens,
            steps,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            cfg_scale=cfg_scale,
            uncond_prefix=uncond,
            generator=generator,
        )
        return seq[:, c_tokens.shape[1] :]

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return self.first_stage.decode_codes(codes.reshape(codes.shape[0], *grid))


@dataclass(frozen=True)
class GeneratorSpec:
    """Everything sampling needs besides the GPT's weights, carried in a native generator checkpoint:
    how the condition becomes the prefix, the code grid, and the tokenizer that decodes the codes
    (its URI and the sha256 of its weights, which a loader verifies)."""

    condition: ConditionConfig
    codebook_size: int
    grid: tuple[int, int]
    tokenizer_uri: str | None = None
    tokenizer_sha256: str | None = None
    label_names: list[str] | None = None
    prefix_length: int = 1  # condition tokens: 1 (unconditional, class), the condition grid otherwise
    condition_column: str | None = None  # spatial: the code-shard column of the condition codes
    condition_tokenizer_sha256: str | None = None
    condition_tokenizer_uri: str | None = None  # spatial: what tokenizes a user's condition maps
    condition_params: dict | None = None  # spatial: how the condition was made (e.g. lowres factor)
    objective: str = "autoregressive"  # the raster prior, or masked (models.maskgit)

    @property
    def block_size(self) -> int:
        """The shortest GPT context that fits: condition + image tokens - 1 (raster), condition +
        image tokens (masked: every code is an input, masked or not)."""
        return self.prefix_length + self.grid[0] * self.grid[1] - (0 if self.objective == "masked" else 1)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["grid"] = list(self.grid)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> GeneratorSpec:
        d = dict(d)
        d["condition"] = ConditionConfig(**d["condition"])
        d["grid"] = tuple(d["grid"])
        return cls(**d)
