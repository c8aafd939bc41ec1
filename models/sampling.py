"""Sampling image codes from a generator, reproducibly per sample: the one path the ``sample``
stage, ``train_gpt``'s sample grids and the benchmarks use.

Randomness: sample ``i`` of a run with ``seed`` draws its numbers from a Philox stream keyed by
``(seed, i)`` alone, one uniform per position, turned into tokens by inverse CDF
(:func:`models.gpt.inverse_cdf`). Nothing depends on which batch, actor or device the sample
lands in, or on how many samples ran before it.

Floating point is the other half: a matrix product's rows are not bitwise the same at every
batch size (measured here: MKL's sgemm gives row 0 other bits at 1 row than at 4, and a
convolution at batch 1 other bits than at 2), and one flipped bit can move a sampled token across
an inverse-CDF boundary. So every computation runs at shapes fixed by ``tile`` alone: batches
are padded to a multiple of ``tile`` rows (matrix rows are the same at every multiple of the
micro-kernel height, and :func:`rows_independent` checks that on the device at hand; where it
fails the GPT runs tile by tile), and the decoder always decodes exactly ``tile`` images per call.
``tile`` is part of what a sample is; ``batch_size`` is not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from models.gpt import GPT, sample_sliding_window
from models.net2net import GeneratorSpec, condition_prefix


@dataclass(frozen=True)
class SamplerOptions:
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    cfg_scale: float | None = None  # classifier-free guidance (needs a model with a null condition)
    cfg_schedule: Literal["constant", "linear"] = "constant"  # linear: 1 at the first position -> cfg_scale
    greedy: bool = False  # argmax at every position (no randomness)
    window: Literal["exact", "strided"] = "exact"  # grids larger than the training grid: sliding window
    window_stride: int | None = None  # strided: positions per window move (None: a quarter window)

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.cfg_scale is not None and self.cfg_scale < 0:
            raise ValueError(f"cfg_scale must be >= 0, got {self.cfg_scale}")
        if self.window_stride is not None and self.window_stride < 1:
            raise ValueError("window_stride must be >= 1")

    @property
    def effective_temperature(self) -> float:
        return 0.0 if self.greedy else self.temperature

    def guidance(self, steps: int) -> list[float] | None:
        """The guidance scale at each of ``steps`` positions (None: no guidance)."""
        s = self.cfg_scale
        if s is None:
            return None
        if self.cfg_schedule == "constant" or steps == 1:
            return [float(s)] * steps
        return [1.0 + (s - 1.0) * t / (steps - 1) for t in range(steps)]


def sample_uniforms(seed: int, indices: Sequence[int], n: int) -> torch.Tensor:
    """(len(indices), n) float64 uniforms in [0, 1): sample i's from Philox keyed by (seed, i)."""
    if seed < 0:
        raise ValueError("seed must be >= 0")
    rows = [np.random.Generator(np.random.Philox(key=[seed, int(i)])).random(n) for i in indices]
    return torch.from_numpy(np.stack(rows) if rows else np.zeros((0, n)))


def padded(n: int, tile: int) -> int:
    return -(-n // tile) * tile


def _pad_rows(x: torch.Tensor, rows: int, fill: torch.Tensor | float | None = None) -> torch.Tensor:
    """x with rows appended up to ``rows`` (copies of row 0, or ``fill``); padding is never output."""
    extra = rows - x.shape[0]
    if extra <= 0:
        return x
    pad = (
        x[:1].expand(extra, *x.shape[1:])
        if fill is None
        else torch.full_like(x[:1], fill).expand(extra, *x.shape[1:])
    )
    return torch.cat([x, pad])


@torch.no_grad()
def rows_independent(gpt: GPT, prefix_length: int, tile: int, steps: int = 3) -> bool:
    """Whether this device computes a sample's logits bitwise alike in a batch of ``tile`` rows and
    in a batch of ``3 * tile`` rows where it sits elsewhere (prefill and cached steps)."""
    device = gpt.pos_emb.device
    g = torch.Generator().manual_seed(1234)
    c = gpt.config
    if c.is_local:
        p, n = c.n_prefix, c.n_prefix + steps
    else:
        n = min(prefix_length + steps, c.block_size)
        p = min(prefix_length, n - 1)
    x = torch.randint(0, c.vocab_size, (3 * tile, n), generator=g).to(device)

    def run(rows: torch.Tensor) -> torch.Tensor:
        return gpt.cached_logits(rows[:, :p], rows[:, p:])

    alone = run(x[tile : 2 * tile])
    among = run(x)[tile : 2 * tile]
    return bool(torch.equal(alone, among))


@torch.no_grad()
def generate_codes(
    gpt: GPT,
    spec: GeneratorSpec,
    raw: torch.Tensor,
    uniforms: torch.Tensor,
    options: SamplerOptions,
    *,
    grid: tuple[int, int] | None = None,
    tile: int = 8,
    whole_batch: bool = True,
) -> torch.Tensor:
    """Codes (B, h * w) for raw conditions ``raw`` (class ids (B,), spatial condition codes
    (B, h * w), anything (B, ...) when unconditional) with their ``uniforms`` (B, h * w).

    ``grid`` larger than ``spec.grid`` samples with the sliding window (a square training grid is
    the window), or, for a model with local attention, in one pass (its window slides by itself).
    Batches run padded to a multiple of ``tile``; ``whole_batch=False`` runs them tile by tile
    (devices where :func:`rows_independent` fails)."""
    b = raw.shape[0]
    h, w = grid or spec.grid
    if uniforms.shape != (b, h * w):
        raise ValueError(f"uniforms must be {(b, h * w)}, got {tuple(uniforms.shape)}")
    device = gpt.pos_emb.device
    rows = padded(max(b, 1), tile)
    raw_p = _pad_rows(raw.to(device), rows)
    u_p = _pad_rows(uniforms, rows, 0.5)
    step = rows if whole_batch else tile
    out = [
        _generate(gpt, spec, raw_p[lo : lo + step], u_p[lo : lo + step], options, (h, w))
        for lo in range(0, rows, step)
    ]
    return torch.cat(out)[:b]


def _generate(gpt, spec: GeneratorSpec, raw, uniforms, options: SamplerOptions, grid) -> torch.Tensor:
    cond = spec.condition
    prefix = condition_prefix(cond, raw)
    h, w = grid
    uncond = None
    if options.cfg_scale is not None:
        if cond.null_token is None:
            raise ValueError("this generator was trained without a null condition: no guidance")
        uncond = torch.full_like(prefix, cond.null_token)
    scales = options.guidance(h * w)
    common = dict(
        temperature=options.effective_temperature,
        top_k=options.top_k,
        top_p=options.top_p,
        n_codes=spec.codebook_size,
        uniforms=uniforms,
        cfg_scale=scales,
    )
    if (h, w) == tuple(spec.grid) or gpt.config.is_local:
        seq = gpt.generate(prefix, h * w, uncond_prefix=uncond, grid=(h, w), **common)
        return seq[:, prefix.shape[1] :]
    g = spec.grid[0]
    stride = None if options.window == "exact" else (options.window_stride or max(1, g // 4))
    spatial = cond.mode == "spatial"
    c = prefix.reshape(-1, h, w) if spatial else prefix
    un = None if uncond is None else uncond.reshape(c.shape)
    codes = sample_sliding_window(gpt, c, (h, w), g, stride=stride, uncond=un, **common)
    return codes.reshape(codes.shape[0], -1)


@torch.no_grad()
def decode_tiles(tokenizer, codes: torch.Tensor, tile: int = 8) -> torch.Tensor:
    """Codes (B, h, w) -> images (B, C, H, W) in [-1, 1] (float32), exactly ``tile`` per decoder call."""
    b = codes.shape[0]
    device = next(tokenizer.parameters()).device
    padded_codes = _pad_rows(codes.to(device), padded(max(b, 1), tile))
    out = [
        tokenizer.decode_codes(padded_codes[lo : lo + tile]).float()
        for lo in range(0, padded_codes.shape[0], tile)
    ]
    return torch.cat(out)[:b]
