"""The conditional transformer against taming's own recipe, on the same condition and image codes:
Fashion-MNIST tokenized by the ``superres`` (4x4-block low-resolution condition) and ``edges2img``
(Canny edges) configs, each condition by its own tokenizer (8x8 codes, the prefix), the image by
the image tokenizer (8x8 codes). Both recipes train the same 4 x 128 transformer for the same
steps on the same batches; the figure is val bits per image code given the condition, on the test
split, with the unigram baseline (no condition, no context) beside.

    python -m tests.bench conditional_gpt     # runs both configs up to tokenize first (~1 h here)

See ``tests/bench/gpt_recipes.py``: ``official`` is minGPT with Net2NetTransformer's optimizer
(constant lr 4.5e-6 x batch, AdamW (0.9, 0.95), decay 0.01) and the condition codes as a prefix
sharing the image codes' ids; ``ours`` is ``train_gpt``'s defaults for ``condition: lowres|edges``.
"""

from __future__ import annotations

import torch

from tests.bench.bench_gpt_quality import BATCH, SIZE, batches, train

STEPS = 1000
TASKS = {"superres": "lowres", "edges2img": "edges"}  # config -> condition


def run(quick: bool = False) -> dict:
    from infra import code_shards
    from stages import train_gpt
    from tests.bench.data import code_arrays, pipeline_codes
    from tests.bench.gpt_recipes import OfficialRecipe, OurRecipe
    from tests.bench.reference import import_taming

    steps = 100 if quick else STEPS
    out: dict = {"model": "4 layers x 128, 8 heads", "steps": steps, "batch": BATCH}
    for config, condition in TASKS.items():
        uri = pipeline_codes(config)
        column = f"{condition}_codes"
        d = code_shards.describe(uri)
        train_c, train_x = code_arrays(uri, "train", column)
        test_c, test_x = code_arrays(uri, "test", column)
        k, kc = d.codebook_size, d.conditions[column].codebook_size
        p = torch.bincount(train_x.reshape(-1), minlength=k).double() / train_x.numel()
        task: dict = {
            "codes": f"{uri} (train {len(train_x)}, test {len(test_x)} rows)",
            "image_codes": f"{d.grid[0]}x{d.grid[1]} of {k}",
            "condition_codes": f"{d.conditions[column].grid[0]}x{d.conditions[column].grid[1]} of {kc}",
            "unigram_bits_per_token": round(float(-(p[p > 0] * p[p > 0].log2()).sum()), 3),
        }
        plan = train_gpt.plan(
            train_gpt.TrainGPTConfig(
                codes_uri=uri, condition=condition, steps=steps, batch_size=BATCH, **SIZE
            )
        )
        recipes = {"ours": lambda plan=plan: OurRecipe(plan, steps)}
        if import_taming():
            prefix = d.conditions[column].length
            common = dict(codebook_size=k, tokens=d.num_tokens, batch=BATCH, steps=steps, **SIZE)
            recipes["official"] = lambda common=common, prefix=prefix, kc=kc: OfficialRecipe(
                **common, prefix=prefix, cond_codebook_size=kc
            )
        else:
            task["official"] = "reference taming code missing (see tests/bench/reference.py)"
        for name, make in recipes.items():
            torch.manual_seed(0)
            recipe = make()
            sec = train(recipe, batches(train_c, train_x), steps, label=f"{config}/{name}")
            task[name] = {
                "val_bits_per_token": round(recipe.val_bits(test_c, test_x), 4),
                "params": recipe.num_params(),
                "s_per_step": round(sec, 4),
            }
            print(f"{config}/{name}: {task[name]}", flush=True)
        if "official" in recipes:
            task["val_bits_ours_over_official"] = round(
                task["ours"]["val_bits_per_token"] / task["official"]["val_bits_per_token"], 3
            )
        out[config] = task
    return out
