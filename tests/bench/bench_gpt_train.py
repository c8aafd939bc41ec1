"""Transformer training throughput (tokens/s).

1. The stage with 1 and 2 Ray Train workers on the demo codes (4 x 128, batch 64, 64 tokens), from
   the rank-0 ``train/tokens_per_s`` metric after the first logging interval (start-up excluded).
2. One training step in this process, ours (``models.gpt_training.GPTTrainer``: SDPA attention,
   clipping, the schedule) against the official minGPT step with Net2NetTransformer's optimizer, on
   the same batches, at the demo size and at 8 x 256 with 256 tokens; interleaved, median of 3.
3. On a GPU only (absolute numbers): a ``gpt-b`` model (12 x 768) at 256 tokens in bf16: tokens/s,
   model FLOPs utilisation against the device's dense bf16 peak, and the largest batch that fits.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import torch

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}  # dense, per device


def stage_rates(quick: bool) -> dict:
    from mlflow.tracking import MlflowClient

    from infra import tracking
    from infra.cluster import ensure_ray
    from infra.devices import Resources
    from stages import train_gpt
    from tests.bench.data import demo_codes

    uri = demo_codes()
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        ensure_ray()
        for workers in (1, 2):
            cfg = train_gpt.TrainGPTConfig(
                codes_uri=uri,
                output_uri=f"{tmp}/gpt{workers}",
                steps=30 if quick else 80,
                batch_size=64,
                n_head=8,
                log_every=10,
                val_every=0,
                sample_every=0,
                checkpoint_every=10_000,
                resources=Resources(workers=workers),
            )
            res = train_gpt.run(cfg, "bench")
            hist = MlflowClient(tracking.tracking_uri()).get_metric_history(
                res.manifest.mlflow_run_id, "train/tokens_per_s"
            )
            rates = [m.value for m in sorted(hist, key=lambda m: m.step)][1:]
            out[f"workers_{workers}"] = {"tokens_per_s": round(statistics.median(rates)), "steps": cfg.steps}
            print(out, flush=True)
    out["speedup_2_over_1"] = round(out["workers_2"]["tokens_per_s"] / out["workers_1"]["tokens_per_s"], 2)
    return out


def step_rates(have_ref: bool, n_layer: int, n_embd: int, tokens: int, batch: int, rounds: int) -> dict:
    from models.gpt import GPTConfig
    from models.gpt_training import GPTRecipe
    from models.net2net import GeneratorSpec, native_condition
    from stages.train_gpt import TrainGPTPlan
    from tests.bench.gpt_recipes import OfficialRecipe, OurRecipe

    k, n_head = 512, max(1, n_embd // 32)
    side = int(tokens**0.5)
    cond, vocab = native_condition("class", k, 0.1, n_classes=10)
    spec = GeneratorSpec(cond, k, (side, side))
    gcfg = GPTConfig(vocab_size=vocab, block_size=tokens, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    recipe = GPTRecipe(lr=GPTRecipe().peak_lr(n_embd))
    plan = TrainGPTPlan(
        inputs=(),
        codes=None,
        spec=spec,
        gpt=gcfg,
        recipe=recipe,
        raw="label",
        columns=(),
        labels=None,
        train_rows=0,
    )
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (batch,), generator=gen)
    codes = torch.randint(0, k, (batch, tokens), generator=gen)
    recipes = {"ours": OurRecipe(plan, 10_000)}
    if have_ref:
        recipes["official"] = OfficialRecipe(k, tokens, n_layer, n_head, n_embd, batch, 10_000)
    times: dict[str, list[float]] = {n: [] for n in recipes}
    for r in recipes.values():
        r.train_step(labels, codes)  # warm-up
    for _ in range(3):
        for n, r in recipes.items():
            t0 = time.perf_counter()
            for _ in range(rounds):
                r.train_step(labels, codes)
            times[n].append((time.perf_counter() - t0) / rounds)
    res: dict = {"model": f"{n_layer} x {n_embd}, {n_head} heads", "tokens": tokens, "batch": batch}
    for n, ts in times.items():
        res[f"{n}_tokens_per_s"] = round(batch * tokens / statistics.median(ts))
    if have_ref:
        res["ratio_ours_over_official"] = round(res["ours_tokens_per_s"] / res["official_tokens_per_s"], 2)
    print(res, flush=True)
    return res


def gpu_rates() -> dict:
    if not torch.cuda.is_available():
        return {"skipped": "no GPU on this machine: absolute figures only come from a GPU run"}
    from models.gpt import GPT, PRESETS, num_params
    from models.gpt_training import GPTRecipe, GPTTrainer

    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    cfg = PRESETS["gpt-b"]
    torch.manual_seed(0)
    model = GPT(cfg).cuda()
    trainer = GPTTrainer(model, GPTRecipe(lr=3e-4), 16384, 10_000, autocast_dtype=torch.bfloat16)
    n = num_params(model) - model.pos_emb.numel() - model.tok_emb.weight.numel()
    t = cfg.block_size

    def rate(batch: int, steps: int = 10) -> float:
        prefix = torch.randint(16384, 16384 + 1000, (batch, 1), device="cuda")
        codes = torch.randint(0, 16384, (batch, t), device="cuda")
        trainer.train_step(prefix, codes)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step(prefix, codes)
        torch.cuda.synchronize()
        return batch * t * steps / (time.perf_counter() - t0)

    out: dict = {"device": name, "model": "gpt-b 12 x 768", "tokens": t, "params_non_embedding": n}
    tps = rate(64)
    flops_per_token = 6 * n + 12 * cfg.n_layer * cfg.n_embd * t  # weights + attention (fwd + bwd)
    out["tokens_per_s_batch64"] = round(tps)
    if peak:
        out["mfu_batch64"] = round(tps * flops_per_token / (peak * 1e12), 3)
    largest, batch = 64, 128
    while batch <= 8192:
        try:
            rate(batch, 2)
            largest, batch = batch, batch * 2
        except torch.OutOfMemoryError:
            break
    out["largest_batch_fits"] = largest
    torch.cuda.empty_cache()
    return out


def run(quick: bool = False) -> dict:
    from tests.bench.reference import import_taming

    torch.set_num_threads(os.cpu_count() or 1)
    have_ref = import_taming()
    out: dict = {"reference": "CompVis/taming-transformers minGPT" if have_ref else "missing"}
    out["stage"] = stage_rates(quick)
    out["step_demo"] = step_rates(have_ref, 4, 128, 64, 64, 5 if quick else 20)
    out["step_8x256_256tok"] = step_rates(have_ref, 8, 256, 256, 16, 2 if quick else 5)
    out["gpu"] = gpu_rates()
    return out
