"""The masked prior (MaskGIT, Chang et al., CVPR 2022) beside the raster one: a bidirectional
transformer over the same codes that predicts masked codes, and decodes a whole grid in a few
parallel passes.

The model is :class:`models.gpt.GPT` with ``bidirectional=True``; its input is the condition
prefix (as the raster prior's: a class or the null token) then the grid's codes in raster order,
masked ones replaced by the ``[MASK]`` token, the vocabulary's last id. Its output at a grid
position are logits over the codebook (the first ``codebook_size`` ids).

- Training (:func:`masked_loss`): per row, a mask ratio ``cos(pi/2 * r)`` with ``r`` uniform in
  [0, 1), that many positions (at least one) masked at random, cross-entropy on the masked
  positions only (label smoothing optional).
- Decoding (:func:`decode`): all positions masked; at step ``t`` of ``steps`` every masked
  position draws a code (temperature, top-k); each drawn code's confidence is its log-probability
  plus Gumbel noise scaled by ``choice_temperature * (1 - (t + 1) / steps)`` (MaskGIT's annealed
  randomness, 4.5 by default); the least confident stay masked, as many as the cosine
  :func:`schedule` plans, the rest are kept. Classifier-free guidance as the raster sampler has
  it: ``uncond + s * (cond - uncond)`` with the null condition.
- Randomness: a sample draws from its own uniforms alone (``uniforms``: per sample
  ``2 * steps * n`` numbers, :func:`models.sampling.sample_uniforms` keyed by (seed, i)): a code
  by inverse CDF and a Gumbel variate per position and step, so batch size and actors do not
  change a sample.

Cost: each step is one full forward over the whole sequence, so ``steps`` passes spend ``steps``
forwards' FLOPs, where the raster prior with its KV cache spends about one forward's in total,
one position at a time: the masked prior wins in sequential passes, not in arithmetic.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from models.gpt import GPT
from models.token_sampling import inverse_cdf, top_k_filter


def mask_token(model: GPT) -> int:
    """The ``[MASK]`` id: the vocabulary's last."""
    return model.config.vocab_size - 1


def mask_ratio(r: torch.Tensor) -> torch.Tensor:
    """MaskGIT's cosine schedule: the share of codes masked at ``r`` in [0, 1]."""
    return torch.cos(math.pi / 2 * r)


def masked_loss(
    model: GPT,
    prefix: torch.Tensor,
    codes: torch.Tensor,
    codebook_size: int,
    generator: torch.Generator | None = None,
    label_smoothing: float = 0.0,
    ratio: float | None = None,
) -> torch.Tensor:
    """Mean cross-entropy over the masked positions. prefix (B, P) condition tokens, codes (B, N);
    ``ratio``: mask this share of every row (validation at fixed ratios) instead of drawing one."""
    b, n = codes.shape
    dev = codes.device
    if ratio is None:
        r = torch.rand(b, generator=generator, device="cpu").to(dev)
        share = mask_ratio(r)
    else:
        share = torch.full((b,), float(ratio), device=dev)
    count = (share * n).ceil().clamp(1, n).long()  # (B,)
    scores = torch.rand(b, n, generator=generator, device="cpu").to(dev)
    rank = scores.argsort(1).argsort(1)  # a random order of the positions per row
    masked = rank < count[:, None]
    x = torch.where(masked, torch.full_like(codes, mask_token(model)), codes)
    logits = model(torch.cat([prefix, x], 1))[:, prefix.shape[1] :, :codebook_size]
    return F.cross_entropy(logits[masked].float(), codes[masked], label_smoothing=label_smoothing)


def schedule(n: int, steps: int) -> list[int]:
    """How many codes stay masked after each step: the cosine schedule, at least one unmasked per
    step and none left after the last (``steps`` = ``n``: one per step)."""
    if not 1 <= steps <= n:
        raise ValueError(f"steps must lie in [1, {n}] (the codes of the grid), got {steps}")
    left, out = n, []
    for t in range(steps):
        want = math.floor(n * math.cos(math.pi / 2 * (t + 1) / steps))
        left = max(min(want, left - 1), steps - t - 1)  # room for one per remaining step
        out.append(left)
    return out


def _logits(model: GPT, prefix, x, codebook_size: int, null_prefix, scale: float | None):
    """Log-probabilities (B, N, K) over the codebook for every grid position, guided."""
    p = prefix.shape[1]
    if scale is None or null_prefix is None:
        return model(torch.cat([prefix, x], 1))[:, p:, :codebook_size].float().log_softmax(-1)
    both = model(torch.cat([torch.cat([prefix, x], 1), torch.cat([null_prefix, x], 1)], 0))
    cond, uncond = both[:, p:, :codebook_size].float().chunk(2)
    return (uncond + scale * (cond - uncond)).log_softmax(-1)


@torch.no_grad()
def decode(
    model: GPT,
    prefix: torch.Tensor,
    n: int,
    codebook_size: int,
    steps: int,
    uniforms: torch.Tensor | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    choice_temperature: float = 4.5,
    cfg_scale: float | None = None,
    null_prefix: torch.Tensor | None = None,
) -> torch.Tensor:
    """Codes (B, n) decoded in ``steps`` parallel passes behind ``prefix`` (B, P); ``uniforms``
    (B, 2 * steps * n) in [0, 1) make each row reproducible alone (None: torch's generator);
    temperature 0 draws the most likely code."""
    b, dev = prefix.shape[0], prefix.device
    plan = schedule(n, steps)
    if uniforms is None:
        uniforms = torch.rand(b, 2 * steps * n, dtype=torch.float64)
    if uniforms.shape != (b, 2 * steps * n):
        raise ValueError(f"uniforms must be ({b}, {2 * steps * n}), got {tuple(uniforms.shape)}")
    u = uniforms.reshape(b, steps, 2, n)
    mask_id = mask_token(model)
    x = torch.full((b, n), mask_id, dtype=torch.long, device=dev)
    for t in range(steps):
        masked = x == mask_id
        logp = _logits(model, prefix, x, codebook_size, null_prefix, cfg_scale)  # (B, n, K)
        if temperature == 0:
            drawn = logp.argmax(-1)
        else:
            scaled = logp / temperature
            if top_k is not None:
                scaled = top_k_filter(scaled, top_k)
            probs = scaled.softmax(-1).reshape(b * n, -1)
            drawn = inverse_cdf(probs, u[:, t, 0].reshape(-1)).reshape(b, n).to(dev)
        conf = logp.gather(-1, drawn[..., None])[..., 0].double()
        anneal = choice_temperature * (1 - (t + 1) / steps)
        if anneal > 0:
            g = -torch.log(-torch.log(u[:, t, 1].clamp(1e-300, 1 - 1e-16))).to(dev)
            conf = conf + anneal * g
        conf = conf.masked_fill(~masked, float("inf"))  # codes kept earlier stay
        stay = plan[t]
        x = torch.where(masked, drawn, x)
        if stay:  # the least confident of this step stay masked (ties: the later position)
            lowest = conf.argsort(dim=1, descending=True, stable=True)[:, n - stay :]
            x.scatter_(1, lowest, mask_id)
    return x
