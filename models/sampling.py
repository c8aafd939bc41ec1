"""Sampling image codes from a generator, reproducibly per sample: the one path the ``sample``
stage, ``train_gpt``'s sample grids and the benchmarks use.

Randomness: sample ``i`` of a run with ``seed`` draws its numbers from a Philox stream keyed by
``(seed, i)`` alone, one uniform per position, turned into tokens by inverse CDF
(:func:`models.token_sampling.inverse_cdf`). Nothing depends on which batch, actor or device the sample
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

import numpy as np
import torch

from models.gpt import GPT, KVCache
from models.net2net import GeneratorSpec, condition_prefix
from models.sampler_options import SamplerOptions
from models.token_sampling import Generators, Scales, per_step, sample_next


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
        if c.bidirectional:  # the masked prior: whole-sequence forwards
            return gpt(rows)
        return gpt.cached_logits(rows[:, :p], rows[:, p:])

    alone = run(x[tile : 2 * tile])
    among = run(x)[tile : 2 * tile]
    return bool(torch.equal(alone, among))


def uniforms_needed(spec: GeneratorSpec, options: SamplerOptions, grid: tuple[int, int] | None = None) -> int:
    """Uniforms per sample: one per code (raster), two per code and step (masked: a code and a
    Gumbel variate for its confidence)."""
    h, w = grid or spec.grid
    return 2 * options.steps * h * w if spec.objective == "masked" else h * w


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
    if spec.objective == "masked" and (h, w) != tuple(spec.grid):
        raise ValueError(f"a masked generator samples its training grid {spec.grid} only, not {(h, w)}")
    need = uniforms_needed(spec, options, (h, w))
    if uniforms.shape != (b, need):
        raise ValueError(f"uniforms must be {(b, need)}, got {tuple(uniforms.shape)}")
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
    if spec.objective == "masked":
        from models.maskgit import decode

        return decode(
            gpt,
            prefix,
            h * w,
            spec.codebook_size,
            options.steps,
            uniforms,
            temperature=options.effective_temperature,
            top_k=options.top_k,
            choice_temperature=options.choice_temperature,
            cfg_scale=options.cfg_scale,
            null_prefix=uncond,
        )
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


# --------------------------------------------------------------------------- the sliding window


def _window_start(i: int, n: int, g: int, stride: int | None = None) -> int:
    """Offset of the window (size g) that generates index i of n.

    ``stride=None`` is the official rule (the window follows i one step at a time, centred where
    the borders allow). With a stride s the window moves in steps of s, so s consecutive positions
    share it; each position still sees at least g/2 - s/2 rows/columns of context before it.
    """
    if stride is not None:
        return min(max(0, ((i - g // 2 + stride // 2) // stride) * stride), n - g)
    if i <= g // 2:
        local = i
    elif n - i < g // 2:
        local = g - (n - i)
    else:
        local = g // 2
    return i - local


@torch.no_grad()
def sample_sliding_window(
    gpt: GPT,
    cond: torch.Tensor,
    shape: tuple[int, int],
    window: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: Generators = None,
    stride: int | None = None,
    uniforms: torch.Tensor | None = None,
    cfg_scale: Scales = None,
    uncond: torch.Tensor | None = None,
    n_codes: int | None = None,
) -> torch.Tensor:
    """Sample an image-code grid larger than the training window, exactly by the official rule.

    cond: either condition codes on the same grid (B, H, W) (the window holds g*g condition tokens,
    then g*g image tokens), or a fixed prefix (B, P) that every window starts with (class,
    unconditional). For grid position (i, j) the official code feeds the window around it in full
    and reads one logit. Here the condition part of each window position is computed once and kept
    in a KV cache, the image part is fed only up to the read position, and where consecutive
    positions share a window (near the borders) the cache is extended by one token instead of
    recomputed. The logits are those of the official computation.

    ``stride`` (near-exact, much faster): windows move in steps of ``stride`` instead of 1, so each
    window serves up to stride x stride positions through its cache. Positions see slightly less
    context on one side than under the official rule, so samples differ from it.

    ``uniforms`` (B, H * W) in raster order, ``cfg_scale`` (one number or one per position) with
    ``uncond`` (cond's shape, the null condition) and ``n_codes`` work as in :meth:`GPT.generate`.
    """
    b, (h, w), g = cond.shape[0], shape, window
    spatial = cond.dim() == 3
    if spatial and cond.shape[1:] != (h, w):
        raise ValueError(f"condition grid {tuple(cond.shape[1:])} must match the image grid {(h, w)}")
    n_cond = g * g if spatial else cond.shape[1]
    if h < g or w < g or n_cond + g * g - 1 > gpt.config.block_size:
        raise ValueError(
            f"window {g} needs a grid of at least {g}x{g} and block_size >= {n_cond + g * g - 1}"
        )
    guided = cfg_scale is not None
    if guided and (uncond is None or uncond.shape != cond.shape):
        raise ValueError("classifier-free guidance needs uncond with the condition's shape")
    scales = per_step(cfg_scale, h * w)
    both = torch.cat([cond, uncond]) if guided else cond
    limit = slice(None) if n_codes is None else slice(0, n_codes)
    img = torch.zeros(b, h, w, dtype=torch.long, device=cond.device)
    caches: dict[tuple[int, int], tuple[KVCache, torch.Tensor, int]] = {}  # window -> cache, logits, n_img
    row_start = -1
    for i in range(h):
        rs = _window_start(i, h, g, stride)
        if rs != row_start:  # windows of earlier row starts are never used again
            caches, row_start = {}, rs
        for j in range(w):
            cs = _window_start(j, w, g, stride)
            li, lj = i - rs, j - cs
            need = li * g + lj  # image tokens before the read position, in window order
            if (rs, cs) not in caches:
                cache = gpt.new_cache(both.shape[0], n_cond + g * g - 1)
                c_tokens = both[:, rs : rs + g, cs : cs + g].reshape(-1, n_cond) if spatial else both
                caches[(rs, cs)] = (cache, gpt(c_tokens, cache, 0)[:, -1, limit], 0)
            cache, last_logits, have = caches[(rs, cs)]
            if need > have:
                tokens = img[:, rs : rs + g, cs : cs + g].reshape(b, g * g)[:, have:need]
                tokens = torch.cat([tokens, tokens]) if guided else tokens
                last_logits = gpt(tokens, cache, n_cond + have)[:, -1, limit]
                caches[(rs, cs)] = (cache, last_logits, need)
            elif need < have:  # cannot happen in raster order; guard the invariant
                raise RuntimeError("sliding-window cache went backwards")
            logits = last_logits
            if guided:
                c, u_ = last_logits.float().chunk(2)
                logits = u_ + scales[i * w + j] * (c - u_)
            u = None if uniforms is None else uniforms[:, i * w + j]
            img[:, i, j] = sample_next(logits, temperature, top_k, top_p, generator, u)[:, 0]
    return img


def official_window_logits(
    gpt: GPT, cond: torch.Tensor, img: torch.Tensor, i: int, j: int, g: int
) -> torch.Tensor:
    """The official per-position computation (full window forward), for tests and benchmarks."""
    h, w = img.shape[1:]
    rs, cs = _window_start(i, h, g), _window_start(j, w, g)
    b = img.shape[0]
    seq = torch.cat(
        [cond[:, rs : rs + g, cs : cs + g].reshape(b, -1), img[:, rs : rs + g, cs : cs + g].reshape(b, -1)], 1
    )
    logits = gpt(seq[:, :-1])
    return logits[:, g * g - 1 + (i - rs) * g + (j - cs)]
