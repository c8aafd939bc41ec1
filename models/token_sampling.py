"""Choosing the next token from a model's logits: top-k and nucleus filtering, temperature, and
draws that make each sample reproducible alone (one ``torch.Generator`` per row, or one
precomputed uniform per row and position, turned into a token by inverse CDF); classifier-free
guidance scales per step (Ho & Salimans 2022). Shared by :meth:`models.gpt.GPT.generate` and the
sliding window (``models.sampling``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (ties with the k-th kept), the rest -inf."""
    kth = torch.topk(logits, min(k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of tokens whose probability reaches p (at least one)."""
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    remove = cum > p
    remove[..., 1:] = remove[..., :-1].clone()  # keep the token that crosses p
    remove[..., 0] = False
    return logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))


Generators = torch.Generator | Sequence[torch.Generator] | None
Scales = float | Sequence[float] | None


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs (B, V), uniforms u (B,) in [0, 1) -> tokens (B, 1): the first token whose cumulative
    probability exceeds u (float64 sums, row by row; a zero-probability token is never chosen)."""
    cdf = probs.double().cumsum(-1)
    x = (u.to(cdf.device, torch.float64) * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, x, right=True).clamp_(max=probs.shape[-1] - 1)


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: Generators = None,
    uniform: torch.Tensor | None = None,
) -> torch.Tensor:
    """logits (B, V) -> tokens (B, 1). One generator per row, or one uniform per row (``uniform``,
    (B,)), makes each row reproducible alone."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = logits.softmax(-1)
    if uniform is not None:
        return inverse_cdf(probs, uniform)
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs, 1, generator=generator)
    return torch.cat([torch.multinomial(probs[i : i + 1], 1, generator=g) for i, g in enumerate(generator)])


def per_step(scale: Scales, steps: int) -> list[float] | None:
    """``scale`` as one float per step (None: no guidance)."""
    if scale is None:
        return None
    if isinstance(scale, int | float):
        return [float(scale)] * steps
    scales = [float(v) for v in scale]
    if len(scales) != steps:
        raise ValueError(f"{len(scales)} guidance scales for {steps} steps")
    return scales
