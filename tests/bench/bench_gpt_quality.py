"""Transformer quality on real codes: Fashion-MNIST tokenized by the demo tokenizer (f4-small, 8x8
codes of 512), class-conditional, 4 layers x 128, batch 64, 1000 steps; val bits/token on the test
split for the stage's defaults against the official recipe, in the same run on the same batches
(`python -m tests.bench gpt_quality`, ~20 min on 2 CPU cores). See ``tests/bench/gpt_recipes.py``
for what each recipe is. Step time is measured afterwards, interleaved (median of 3 x 20 steps).
"""

from __future__ import annotations

import statistics
import time

import torch

STEPS, BATCH, TIMING_STEPS = 1000, 64, 20
SIZE = {"n_layer": 4, "n_head": 8, "n_embd": 128}


def batches(labels: torch.Tensor, codes: torch.Tensor, seed: int = 0):
    """Shuffled epochs of (labels, codes) batches, the same sequence for every recipe."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(codes), generator=gen)
        for lo in range(0, len(perm) - BATCH + 1, BATCH):
            idx = perm[lo : lo + BATCH]
            yield labels[idx], codes[idx]


def train(recipe, data, steps: int, label: str = "") -> float:
    t0 = time.perf_counter()
    for step in range(steps):
        recipe.train_step(*next(data))
        if label and (step + 1) % 250 == 0:
            print(
                f"  {label}: step {step + 1}/{steps} ({(time.perf_counter() - t0) / (step + 1):.3f} s/step)",
                flush=True,
            )
    return (time.perf_counter() - t0) / steps


def run(quick: bool = False) -> dict:
    from stages import train_gpt
    from tests.bench.data import code_arrays, demo_codes
    from tests.bench.gpt_recipes import OfficialRecipe, OurRecipe
    from tests.bench.reference import import_taming

    steps = 100 if quick else STEPS
    uri = demo_codes()
    train_y, train_c = code_arrays(uri, "train")
    test_y, test_c = code_arrays(uri, "test")
    k = 512
    p = torch.bincount(train_c.reshape(-1), minlength=k).double() / train_c.numel()
    unigram = float(-(p[p > 0] * p[p > 0].log2()).sum())
    plan = train_gpt.plan(
        train_gpt.TrainGPTConfig(codes_uri=uri, condition="class", steps=steps, batch_size=BATCH, **SIZE)
    )
    out: dict = {
        "data": f"{uri} (train {len(train_c)}, test {len(test_c)} rows)",
        "model": "4 layers x 128, 8 heads",
        "steps": steps,
        "batch": BATCH,
        "unigram_bits_per_token_train": round(unigram, 3),
        "ours_recipe": {**plan.recipe.__dict__, "cond_dropout": plan.spec.condition.cond_dropout},
    }
    recipes = {"ours": lambda: OurRecipe(plan, steps)}
    if import_taming():
        common = dict(codebook_size=k, tokens=64, batch=BATCH, steps=steps, **SIZE)
        recipes["official"] = lambda: OfficialRecipe(**common)
        recipes["official_with_schedule"] = lambda: OfficialRecipe(**common, schedule=True)
    else:
        out["official"] = "reference taming code missing (see tests/bench/reference.py)"
    for name, make in recipes.items():
        torch.manual_seed(0)
        recipe = make()
        sec = train(recipe, batches(train_y, train_c), steps, label=name)
        out[name] = {
            "val_bits_per_token": round(recipe.val_bits(test_y, test_c), 4),
            "params": recipe.num_params(),
            "s_per_step_long_phase": round(sec, 4),
        }
        print(f"{name}: {out[name]}", flush=True)
    times: dict[str, list[float]] = {n: [] for n in recipes}
    live = {n: make() for n, make in recipes.items()}
    feeds = {n: batches(train_y, train_c, 1) for n in live}
    for n in live:
        train(live[n], feeds[n], 3)  # warm-up
    for _ in range(3):
        for n in live:
            times[n].append(train(live[n], feeds[n], TIMING_STEPS))
    for n in live:
        out[n]["s_per_step"] = round(statistics.median(times[n]), 4)
    if "official" in live:
        out["step_time_ours_over_official"] = round(
            out["ours"]["s_per_step"] / out["official"]["s_per_step"], 3
        )
        out["val_bits_ours_over_official"] = round(
            out["ours"]["val_bits_per_token"] / out["official"]["val_bits_per_token"], 3
        )
    return out
