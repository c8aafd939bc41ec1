"""GPT sampling on CPU, ours against the official taming code with the same weights, same run.

1. Sampling throughput: a 12-layer, 512-wide GPT, 256 image tokens after an SOS token, batch 16:
   ours ``GPT.generate`` (preallocated KV cache, SDPA) vs the official ``sample_with_past``
   (minGPT ``forward_with_past``); tokens/s, and images/s including the VQGAN decode.
2. Sliding-window sampling on a 32x48 grid with a 16x16 window (condition + image = 511-token
   windows): ours exact (same logits as the official rule) and strided (near-exact) vs the official
   per-token full-window recompute. The official cost is the same 511-token forward at every
   position, so it is timed on a spread of positions and scaled to the grid (stated in the output).
"""

from __future__ import annotations

import os
import sys
import time
import types

import torch

from models.gpt import GPT, PRESETS, GPTConfig
from models.sampling import official_window_logits, sample_sliding_window
from models.vqgan import PRESETS as VQ_PRESETS
from models.vqgan import VQGAN
from tests.bench.reference import import_taming


def _official_gpt(cfg: GPTConfig, ours: GPT):
    # minGPT imports a helper from `transformers` at module level that plain sampling never calls;
    # provide a stand-in so the reference imports without that package.
    sys.modules.setdefault("transformers", types.SimpleNamespace(top_k_top_p_filtering=None))
    from taming.modules.transformer import mingpt

    ref = mingpt.GPT(cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd).eval()
    missing, unexpected = ref.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and all(k.endswith("attn.mask") for k in missing), (missing, unexpected)
    return ref, mingpt.sample_with_past


def bench_sampling(have_ref: bool, batch: int, steps: int) -> dict:
    torch.manual_seed(0)
    cfg = PRESETS["gpt-12x512"]
    gpt = GPT(cfg).eval()
    sos = torch.zeros(batch, 1, dtype=torch.long)
    res: dict = {"model": "12 layers x 512, vocab 1024", "batch": batch, "tokens_per_sample": steps}
    gpt.generate(sos[:2], 4)  # warm-up
    t0 = time.perf_counter()
    codes = gpt.generate(sos, steps, generator=torch.Generator().manual_seed(0))[:, 1:]
    ours_s = time.perf_counter() - t0
    res["ours_tokens_per_s"] = round(batch * steps / ours_s, 1)
    vq = VQGAN(VQ_PRESETS["f16-1024"]).eval()
    side = int(steps**0.5)
    with torch.inference_mode():
        t0 = time.perf_counter()
        vq.decode_codes(codes.reshape(batch, side, side))
        decode_s = time.perf_counter() - t0
    res["decode_s_f16_256px"] = round(decode_s, 1)
    res["ours_images_per_s_incl_decode"] = round(batch / (ours_s + decode_s), 3)
    if have_ref:
        ref, sample_with_past = _official_gpt(cfg, gpt)
        with torch.no_grad():
            sample_with_past(sos[:2], ref, 4)  # warm-up
            t0 = time.perf_counter()
            sample_with_past(sos, ref, steps, sample_logits=True)
            ref_s = time.perf_counter() - t0
        res["official_tokens_per_s"] = round(batch * steps / ref_s, 1)
        res["official_images_per_s_incl_decode"] = round(batch / (ref_s + decode_s), 3)
        res["ratio_tokens_ours_over_official"] = round(ref_s / ours_s, 2)
        res["ratio_images_ours_over_official"] = round((ref_s + decode_s) / (ours_s + decode_s), 2)
        # the same greedy tokens from both (same weights, same rule)
        with torch.no_grad():
            a = gpt.generate(sos[:2], 32, temperature=0)[:, 1:]
            b = sample_with_past(sos[:2], ref, 32, sample_logits=False)
        res["greedy_tokens_identical"] = bool(torch.equal(a, b))
    print(res)
    return res


def bench_window(h: int, w: int, g: int, official_positions: int) -> dict:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=1024, block_size=2 * g * g, n_layer=8, n_head=8, n_embd=256)
    gpt = GPT(cfg).eval()
    cond = torch.randint(0, 1024, (1, h, w))
    res: dict = {"grid": [h, w], "window": g, "model": "8 layers x 256, block 512", "batch": 1}
    t0 = time.perf_counter()
    exact = sample_sliding_window(gpt, cond, (h, w), g, temperature=0)
    exact_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    fast = sample_sliding_window(gpt, cond, (h, w), g, temperature=0, stride=g // 2)
    fast_s = time.perf_counter() - t0
    # official: one full-window forward per position, timed on evenly spread positions
    positions = [(i * h // official_positions, (i * 7919) % w) for i in range(official_positions)]
    with torch.no_grad():
        official_window_logits(gpt, cond, exact, 0, 0, g)  # warm-up
        t0 = time.perf_counter()
        agree = 0
        for i, j in positions:
            agree += int(official_window_logits(gpt, cond, exact, i, j, g).argmax(-1) == exact[:, i, j])
        per_pos = (time.perf_counter() - t0) / len(positions)
    official_s = per_pos * h * w
    res.update(
        official_s_estimated=round(official_s, 1),
        official_positions_timed=len(positions),
        exact_s=round(exact_s, 1),
        strided_s=round(fast_s, 1),
        ratio_exact_over_official=round(official_s / exact_s, 2),
        ratio_strided_over_official=round(official_s / fast_s, 2),
        exact_agrees_with_official_rule_on_timed_positions=f"{agree}/{len(positions)}",
        strided_tokens_equal_to_exact=round(float((fast == exact).float().mean()), 3),
    )
    print(res)
    return res


def run(quick: bool = False) -> dict:
    torch.set_num_threads(os.cpu_count() or 1)
    have_ref = import_taming()
    out = {
        "reference": "CompVis/taming-transformers minGPT"
        if have_ref
        else "missing (see tests/bench/reference.py)"
    }
    out["sampling"] = bench_sampling(have_ref, batch=4 if quick else 16, steps=64 if quick else 256)
    out["sliding_window"] = bench_window(*((16, 24, 8) if quick else (32, 48, 16)), official_positions=24)
    return out
