"""Local 2D attention against full attention and taming's sliding-window recipe
(`python -m tests.bench local_attention`, ~25 min on 2 CPU cores; `--quick` for a smoke run).

1. Cost, at equal width and depth (4 layers x 256, 8 heads, vocab 1024), for code grids of 16x16,
   32x32 and 64x64: the time of a training step (forward, backward, AdamW) per token at a fixed
   number of tokens per step, the activation memory a step keeps for its backward per token (the
   bytes of every tensor autograd saves, counted once per storage: on CPU the honest proxy of peak
   memory; on a GPU the peak allocated is reported too), and cached sampling tokens/s. ``local2d``:
   query blocks of 8x8 codes, memory 4 rows above, 4 columns left and right.
2. Quality at equal steps and equal tokens per step on real data: 4x4 mosaics of Fashion-MNIST
   images tokenized by the demo tokenizer (8x8 codes each, so a mosaic is 32x32 codes; the mosaic's
   codes are its tiles' codes side by side), unconditional, 4 layers x 128. Three models: full
   attention on the whole 32x32 grid, ``local2d`` on the whole grid, and taming's recipe, full
   attention trained on random 16x16 crops and evaluated and sampled with the sliding window (each
   position's likelihood from the window the official sampler uses). Reported: val bits/token on
   mosaics of the test split, and the time to sample one 64x64-code image with each: ``local2d`` in
   one pass, taming's model with the exact sliding-window sampler (the reference: its logits are
   the official rule's, ``models.sampling.sample_sliding_window``), and a full-attention model with a
   4096-token context (random weights: timing only, no such model is trained here).
"""

from __future__ import annotations

import statistics
import time

import torch

from models.gpt import GPT, GPTConfig
from models.gpt_training import GPTRecipe, GPTTrainer, code_loss
from models.sampling import _window_start, sample_sliding_window

WINDOW = dict(block_h=8, block_w=8, flange_top=4, flange_left=4, flange_right=4)
COST = dict(vocab_size=1024, n_layer=4, n_head=8, n_embd=256)
QUALITY = dict(n_layer=4, n_head=8, n_embd=128)
TILE, K = 8, 512  # the demo tokenizer: 8x8 codes of 512 per 32x32 image


def _config(attention: str, grid: tuple[int, int], **size) -> GPTConfig:
    n = grid[0] * grid[1]
    local = {} if attention == "full" else dict(attention=attention, grid_h=grid[0], grid_w=grid[1], **WINDOW)
    return GPTConfig(block_size=n, **size, **local)


def saved_bytes(fn, *args) -> int:
    """Bytes of the tensors autograd saves while ``fn`` runs, each storage once."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(seen.values())


def bench_cost(grids, tokens_per_step: int, sample_batch: int, repeats: int) -> dict:
    out: dict = {"model": "4 layers x 256, 8 heads, vocab 1024", "tokens_per_step": tokens_per_step}
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    for side in grids:
        n = side * side
        batch = max(1, tokens_per_step // n)
        row: dict = {}
        for attention in ("full", "local2d"):
            torch.manual_seed(0)
            model = GPT(_config(attention, (side, side), **COST)).to(device)
            trainer = GPTTrainer(model, GPTRecipe(lr=1e-4, warmup_steps=0), 1024, 100)
            prefix = torch.zeros(batch, 1, dtype=torch.long, device=device)
            codes = torch.randint(0, 1024, (batch, n), device=device)
            trainer.train_step(prefix, codes)  # warm-up
            times = []
            for _ in range(repeats):
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                trainer.train_step(prefix, codes)
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            step_s = statistics.median(times)
            model.train()
            act = saved_bytes(code_loss, model, prefix, codes)
            r = {
                "batch": batch,
                "train_step_s": round(step_s, 4),
                "train_us_per_token": round(1e6 * step_s / (batch * n), 2),
                "saved_activation_bytes_per_token": round(act / (batch * n)),
            }
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                trainer.train_step(prefix, codes)
                r["cuda_peak_bytes_per_token"] = round(torch.cuda.max_memory_allocated() / (batch * n))
            model.eval()
            sos = torch.zeros(sample_batch, 1, dtype=torch.long, device=device)
            model.generate(sos, n)  # warm-up
            t0 = time.perf_counter()
            model.generate(sos, n, generator=None)
            if cuda:
                torch.cuda.synchronize()
            r["sample_tokens_per_s"] = round(sample_batch * n / (time.perf_counter() - t0), 1)
            row[attention] = r
            print(f"  cost {side}x{side} {attention}: {r}", flush=True)
            del model, trainer
        row["train_time_full_over_local"] = round(
            row["full"]["train_step_s"] / row["local2d"]["train_step_s"], 2
        )
        row["activations_full_over_local"] = round(
            row["full"]["saved_activation_bytes_per_token"]
            / row["local2d"]["saved_activation_bytes_per_token"],
            2,
        )
        row["sampling_local_over_full"] = round(
            row["local2d"]["sample_tokens_per_s"] / row["full"]["sample_tokens_per_s"], 2
        )
        out[f"{side}x{side}"] = row
    first, last = f"{grids[0]}x{grids[0]}", f"{grids[-1]}x{grids[-1]}"
    growth = {}
    for attention in ("full", "local2d"):
        a, b = out[first][attention], out[last][attention]
        growth[attention] = {
            "train_us_per_token": round(b["train_us_per_token"] / a["train_us_per_token"], 2),
            "saved_activation_bytes_per_token": round(
                b["saved_activation_bytes_per_token"] / a["saved_activation_bytes_per_token"], 2
            ),
            "sample_s_per_token": round(a["sample_tokens_per_s"] / b["sample_tokens_per_s"], 2),
        }
    out[f"per_token_growth_{first}_to_{last}"] = growth
    return out


# quality ---------------------------------------------------------------------------------------


def mosaics(codes: torch.Tensor, n: int, per_side: int, gen: torch.Generator) -> torch.Tensor:
    """(n, per_side * 8, per_side * 8) code grids of random tiles side by side."""
    idx = torch.randint(0, len(codes), (n, per_side, per_side), generator=gen)
    tiles = codes[idx].reshape(n, per_side, per_side, TILE, TILE)
    return tiles.permute(0, 1, 3, 2, 4).reshape(n, per_side * TILE, per_side * TILE)


def crops(grids: torch.Tensor, side: int, gen: torch.Generator) -> torch.Tensor:
    n, h, w = grids.shape
    r = torch.randint(0, h - side + 1, (n,), generator=gen)
    c = torch.randint(0, w - side + 1, (n,), generator=gen)
    return torch.stack([g[a : a + side, b : b + side] for g, a, b in zip(grids, r.tolist(), c.tolist())])


@torch.no_grad()
def window_bits(gpt: GPT, grids: torch.Tensor, g: int, batch: int = 64) -> float:
    """Bits per code of ``grids`` under the sliding-window rule: code (i, j) predicted by the
    window the official sampler uses for it (positions sharing a window share its forward)."""
    import math

    n, h, w = grids.shape
    total = 0.0
    windows: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for i in range(h):
        for j in range(w):
            windows.setdefault((_window_start(i, h, g), _window_start(j, w, g)), []).append((i, j))
    for lo in range(0, n, batch):
        part = grids[lo : lo + batch]
        sos = torch.zeros(len(part), 1, dtype=torch.long)
        for (rs, cs), cells in windows.items():
            seq = torch.cat([sos, part[:, rs : rs + g, cs : cs + g].reshape(len(part), -1)], 1)
            logp = gpt(seq[:, :-1]).log_softmax(-1)
            for i, j in cells:
                k = (i - rs) * g + (j - cs)
                total -= float(logp[torch.arange(len(part)), k, part[:, i, j]].sum())
    return total / (n * h * w) / math.log(2)


@torch.no_grad()
def grid_bits(gpt: GPT, grids: torch.Tensor, batch: int = 32) -> float:
    import math

    total = 0.0
    for lo in range(0, len(grids), batch):
        part = grids[lo : lo + batch].reshape(min(batch, len(grids) - lo), -1)
        sos = torch.zeros(len(part), 1, dtype=torch.long)
        total += float(code_loss(gpt, sos, part)) * part.numel()
    return total / grids.numel() / math.log(2)


def bench_quality(steps: int, grids_per_step: int, val_mosaics: int, sample_side: int) -> dict:
    from tests.bench.data import code_arrays, demo_codes

    uri = demo_codes()
    _, train = code_arrays(uri, "train")
    _, test = code_arrays(uri, "test")
    train, test = train.reshape(-1, TILE, TILE), test.reshape(-1, TILE, TILE)
    side, crop = 4 * TILE, 2 * TILE  # 32x32-code mosaics, taming's 16x16 crops
    val = mosaics(test, val_mosaics, 4, torch.Generator().manual_seed(123))
    size = dict(vocab_size=K + 1, **QUALITY)
    models = {
        "full_32x32": (GPT(_config("full", (side, side), **size)), None),
        "local2d_32x32": (GPT(_config("local2d", (side, side), **size)), None),
        "taming_crops_16x16": (GPT(_config("full", (crop, crop), **size)), crop),
    }
    out: dict = {
        "data": f"{uri}: 4x4 mosaics of 8x8-code tiles (train {len(train)} tiles, "
        f"val {val_mosaics} mosaics of test tiles)",
        "model": "4 layers x 128, 8 heads, unconditional",
        "steps": steps,
        "tokens_per_step": grids_per_step * side * side,
        "local2d_window": WINDOW,
    }
    for name, (gpt, crop_side) in models.items():
        torch.manual_seed(0)
        trainer = GPTTrainer(gpt, GPTRecipe(lr=2e-3, warmup_steps=min(100, steps // 10)), K, steps)
        gen = torch.Generator().manual_seed(0)  # the same mosaics for every model
        t0 = time.perf_counter()
        for step in range(steps):
            batch = mosaics(train, grids_per_step, 4, gen)
            if crop_side:  # the same tokens per step: every mosaic cut into crops
                batch = torch.cat([crops(batch, crop_side, gen) for _ in range((side // crop_side) ** 2)])
            sos = torch.zeros(len(batch), 1, dtype=torch.long)
            trainer.train_step(sos, batch.reshape(len(batch), -1))
            if (step + 1) % max(1, steps // 4) == 0:
                print(
                    f"  {name}: step {step + 1}/{steps} "
                    f"({(time.perf_counter() - t0) / (step + 1):.3f} s/step)",
                    flush=True,
                )
        gpt.eval()
        bits = window_bits(gpt, val, crop_side) if crop_side else grid_bits(gpt, val)
        out[name] = {
            "val_bits_per_token": round(bits, 4),
            "s_per_step": round((time.perf_counter() - t0) / steps, 3),
        }
        print(f"  {name}: {out[name]}", flush=True)
    # the time to sample one sample_side x sample_side image
    n = sample_side * sample_side
    sos = torch.zeros(1, 1, dtype=torch.long)
    loc = models["local2d_32x32"][0]
    t0 = time.perf_counter()
    loc.generate(sos, n, grid=(sample_side, sample_side), generator=torch.Generator().manual_seed(0))
    out["local2d_32x32"][f"sample_{sample_side}x{sample_side}_s"] = round(time.perf_counter() - t0, 2)
    tam = models["taming_crops_16x16"][0]
    t0 = time.perf_counter()
    sample_sliding_window(
        tam, sos, (sample_side, sample_side), crop, generator=torch.Generator().manual_seed(0)
    )
    out["taming_crops_16x16"][f"sample_{sample_side}x{sample_side}_s_exact_window"] = round(
        time.perf_counter() - t0, 2
    )
    wide = GPT(_config("full", (sample_side, sample_side), **size)).eval()
    t0 = time.perf_counter()
    wide.generate(sos, n, generator=torch.Generator().manual_seed(0))
    out[f"full_{sample_side}x{sample_side}_context_sample_s"] = round(time.perf_counter() - t0, 2)
    key = f"sample_{sample_side}x{sample_side}"
    out[f"{key}_time_window_over_local2d"] = round(
        out["taming_crops_16x16"][f"{key}_s_exact_window"] / out["local2d_32x32"][f"{key}_s"], 2
    )
    out["val_bits_local2d_over_full"] = round(
        out["local2d_32x32"]["val_bits_per_token"] / out["full_32x32"]["val_bits_per_token"], 3
    )
    out["val_bits_local2d_over_taming"] = round(
        out["local2d_32x32"]["val_bits_per_token"] / out["taming_crops_16x16"]["val_bits_per_token"], 3
    )
    return out


def run(quick: bool = False) -> dict:
    if quick:
        cost = bench_cost([16, 32], tokens_per_step=1024, sample_batch=1, repeats=1)
        quality = bench_quality(steps=20, grids_per_step=2, val_mosaics=4, sample_side=32)
    else:
        cost = bench_cost([16, 32, 64], tokens_per_step=4096, sample_batch=4, repeats=3)
        quality = bench_quality(steps=600, grids_per_step=8, val_mosaics=64, sample_side=64)
    return {"cost": cost, "quality": quality, "device": "cuda" if torch.cuda.is_available() else "cpu"}
