"""The masked prior beside the raster one on one set of codes and one evaluation.

Fashion-MNIST demo codes (8x8 codes of 512, class-conditional; ``data.demo_codes``), the same
width, depth, batch and training steps for both (the demo's 4 x 128, 1,000 steps of 64), trained
by the ``train_gpt`` stage with ``objective: autoregressive`` and ``objective: masked``. Then:

1. Quality: the ``sample`` stage (top-k 100, guidance 2.0) and the ``evaluate`` stage (FID, KID,
   precision/recall with the standard Inception; the classifier score) on ``N`` samples each (5,000;
   500 with ``--quick``), raster vs masked at 4 / 8 / 12 / 16 steps.
2. Speed: the stage's per-sample work in this process (``generate_codes`` + decode + PNG, what
   ``bench_sample`` times), images/s at batch 1 (latency) and at the best of a few batches.
3. Transformer FLOPs per image (2 x parameters x positions processed, plus attention): with its KV
   cache the raster prior processes each position once; ``steps`` masked passes process every
   position ``steps`` times. The masked win is in sequential passes, not arithmetic.

    python -m tests.bench masked      # ~2-3 h on 2 CPU cores (the Inception on 5 x 5,000 images)
"""

from __future__ import annotations

import json
import time

import torch

from infra import storage

STEPS_TRAIN, BATCH, SIZE = 1000, 64, {"n_layer": 4, "n_head": 4, "n_embd": 128}
MASKED_STEPS = (4, 8, 12, 16)
SAMPLER = {"temperature": 1.0, "top_k": 100, "cfg_scale": 2.0}
ROOT = ".local/bench/masked"


def _train(codes_uri: str, objective: str, steps: int):
    from infra.devices import Resources
    from models.gpt_training import GPTRecipe
    from stages import train_gpt

    cfg = train_gpt.TrainGPTConfig(
        codes_uri=codes_uri,
        output_uri=storage.join(ROOT, objective),
        condition="class",
        objective=objective,
        steps=steps,
        batch_size=BATCH,
        recipe=GPTRecipe(warmup_steps=100),
        val_every=250,
        sample_every=0,
        resources=Resources(workers=2),
        **SIZE,
    )
    return train_gpt.run(cfg, "taming-bench")


def _quality(model_uri: str, name: str, n: int, steps: int, images_uri: str) -> dict:
    from infra.devices import Resources
    from models.sampler_options import SamplerOptions
    from stages import evaluate, sample

    out = storage.join(ROOT, name)
    t0 = time.perf_counter()
    s = sample.run(
        sample.SampleConfig(
            model_uri=model_uri,
            output_uri=storage.join(out, "samples"),
            samples_per_class=n // 10,
            sampler=SamplerOptions(**SAMPLER, steps=steps),
            batch_size=64,
            resources=Resources(workers=2),
        ),
        "taming-bench",
    )
    sample_s = time.perf_counter() - t0
    e = evaluate.run(
        evaluate.EvaluateConfig(
            generated_uri=s.output_uri,
            reference_uri=images_uri,
            output_uri=storage.join(out, "evaluation"),
            max_images=n,
            inception="required",
            resources=Resources(cpus_per_worker=2),
        ),
        "taming-bench",
    )
    f = json.loads(storage.read_bytes(e.manifest.data_uris()[0]))["figures"]
    keep = ("fid", "kid", "precision", "recall", "classifier_score", "classifier_score_real")
    return {"samples": n, "sample_stage_s": round(sample_s, 1), **{k: round(f[k], 4) for k in keep if k in f}}


def _speed(model_uri: str, steps: int, batches=(1, 16, 64, 256), n: int = 256) -> dict:
    """images/s of generate + decode + PNG in this process, per batch (batch 1 on fewer images)."""
    from infra import model_store
    from infra.imaging import encode_png, to_uint8_images
    from models.sampler_options import SamplerOptions
    from models.sampling import decode_tiles, generate_codes, sample_uniforms, uniforms_needed

    gen = model_store.load_generator(model_uri)
    spec, gpt = gen.spec, gen.gpt.eval()
    tok = model_store.load_tokenizer(spec.tokenizer_uri, spec.tokenizer_sha256).eval()
    opts = SamplerOptions(**SAMPLER, steps=steps)
    h, w = spec.grid
    out = {}
    for b in batches:
        m = min(n, 16) if b == 1 else n
        t0 = time.perf_counter()
        with torch.inference_mode():
            for lo in range(0, m, b):
                idx = range(lo, min(lo + b, m))
                labels = torch.tensor([i % 10 for i in idx])
                u = sample_uniforms(0, idx, uniforms_needed(spec, opts))
                codes = generate_codes(gpt, spec, labels, u, opts)
                [encode_png(im) for im in to_uint8_images(decode_tiles(tok, codes.reshape(-1, h, w)))]
        out[f"batch_{b}"] = round(m / (time.perf_counter() - t0), 2)
    out["best"] = max(v for k, v in out.items() if k.startswith("batch_"))
    return out


def _flops(spec, gpt_cfg, steps: int | None) -> float:
    """Transformer FLOPs per image: 2 x (non-embedding) parameters per position processed, plus
    attention (2 x 2 x n_embd per query-key pair per layer); guidance doubles every pass."""
    c = gpt_cfg
    params = c.n_layer * 12 * c.n_embd**2  # attention (4 d^2) + MLP (8 d^2) per layer
    n = spec.prefix_length + spec.grid[0] * spec.grid[1]
    guided = 2 if SAMPLER["cfg_scale"] else 1
    if steps is None:  # raster with a KV cache: each position once, attending to those before it
        return guided * (2 * params * n + 4 * c.n_embd * c.n_layer * n * (n + 1) // 2)
    return guided * steps * (2 * params * n + 4 * c.n_embd * c.n_layer * n * n)


def run(quick: bool = False) -> dict:
    from infra import model_store
    from infra.cluster import ensure_ray
    from tests.bench.data import demo_codes

    n = 500 if quick else 5000
    steps = 100 if quick else STEPS_TRAIN
    ensure_ray()
    codes = demo_codes()
    images = storage.join(".local/runs/demo", "images")
    out: dict = {"codes": codes, "model": SIZE, "train_steps": steps, "batch": BATCH, "sampler": SAMPLER}
    trained = {obj: _train(codes, obj, steps) for obj in ("autoregressive", "masked")}
    for obj, r in trained.items():
        out[f"{obj}_val"] = {k: round(v, 4) for k, v in r.figures.items() if k.startswith("val/")}
    variants = [("raster", "autoregressive", 8)] + [(f"masked-{s}", "masked", s) for s in MASKED_STEPS]
    for name, obj, s in variants:
        uri = trained[obj].output_uri
        gen = model_store.describe_generator(uri)
        row = _quality(uri, name, n, s, images)
        row["images_per_s"] = _speed(uri, s)
        row["gflops_per_image"] = round(_flops(gen.spec, gen.gpt, None if obj != "masked" else s) / 1e9, 4)
        row["sequential_passes"] = gen.spec.grid[0] * gen.spec.grid[1] if obj != "masked" else s
        out[name] = row
        print(name, row, flush=True)
    base = out["raster"]
    for name, _, _ in variants[1:]:
        r = out[name]
        r["batch1_speedup_over_raster"] = round(
            r["images_per_s"]["batch_1"] / base["images_per_s"]["batch_1"], 2
        )
        r["best_batch_speedup_over_raster"] = round(
            r["images_per_s"]["best"] / base["images_per_s"]["best"], 2
        )
        r["flops_over_raster"] = round(r["gflops_per_image"] / base["gflops_per_image"], 2)
    return out
