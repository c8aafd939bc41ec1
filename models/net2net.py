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

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from models.gpt import GPT, Generators
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
        if self.training and self.cond.cond_dropout > 0:
            if self.cond.null_token is None:
                raise ValueError("cond_dropout needs a null_token")
            drop = torch.rand(c_tokens.shape[0], 1, device=c_tokens.device) < self.cond.cond_dropout
            c_tokens = torch.where(drop, torch.full_like(c_tokens, self.cond.null_token), c_tokens)
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
