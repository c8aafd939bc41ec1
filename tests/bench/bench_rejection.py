"""Rejection sampling's trade-off (taming's Table 4 on Fashion-MNIST): FID and classifier score of the
demo generator's samples at acceptance 1.0 / 0.5 / 0.25 / 0.1, the same number of kept samples at
every rate, and what each rate costs.

Needs a finished ``make demo`` (its registry and outputs under ``.local/``): the generator is
``models:/demo-gpt@champion``, the rejection classifier the demo evaluation's committed real-data
classifier (``.local/runs/demo/evaluation``), the reference the demo's Fashion-MNIST test images.
Every rate runs the ``sample`` stage (k = 1 / rate candidates per kept sample) and the ``evaluate``
stage (the standard FID Inception, the classifier score) on the same protocol; the reference
implementation in the same run is rate 1.0 (no rejection, today's sampler). The figures go to
``.local/bench/rejection.json`` and to an MLflow run (experiment ``taming-bench``) with the
trade-off plot ``rejection_tradeoff.png``.
"""

from __future__ import annotations

import json
import shutil
import time

from infra import storage

RATES = (1.0, 0.5, 0.25, 0.1)
DEMO = ".local/runs/demo"


def _plot(rows: list[dict], floor: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    xs = [r["classifier_score"] for r in rows]
    ys = [r["fid"] for r in rows]
    ax.plot(xs, ys, "o-")
    for r in rows:
        ax.annotate(
            f"rate {r['acceptance_rate']:g}",
            (r["classifier_score"], r["fid"]),
            xytext=(4, 4),
            textcoords="offset points",
            fontsize=8,
        )
    real = rows[0]["classifier_score_real"]  # the same classifier trained on real images
    ax.plot([real], [floor["fid"]], "*", c="grey", ms=10)
    ax.annotate(
        "real images",
        (real, floor["fid"]),
        xytext=(-4, 6),
        textcoords="offset points",
        fontsize=8,
        ha="right",
    )
    ax.set_xlabel("classifier score (accuracy on real test images)")
    ax.set_ylabel(f"FID ({rows[0]['kept']} samples vs {rows[0]['reference_images']} test images)")
    ax.set_title("Rejection sampling: quality vs what the samples teach")
    fig.tight_layout()
    return fig


def _real_floor(cfg, n: int) -> dict:
    """FID of n real test images disjoint from the evaluation's reference sample (the same n, the
    same reference, its features cached by the stage): what FID a perfect generator gets here."""
    import numpy as np
    import torch

    from infra import inception
    from stages import evaluate

    p = evaluate.plan(cfg)
    x_ref, _ = evaluate._read(*p.reference, cfg.max_images, cfg.seed, p.channels)
    x_test, _ = evaluate._read(*p.reference, 2**62, cfg.seed, p.channels)
    taken = {bytes(x.numpy()) for x in x_ref}
    rest = [i for i in range(len(x_test)) if bytes(x_test[i].numpy()) not in taken]
    pick = np.sort(np.random.default_rng(cfg.seed + 5).choice(len(rest), n, replace=False))
    x_other = x_test[torch.tensor([rest[i] for i in pick])]
    t0 = time.perf_counter()
    f = inception.metrics(x_other, x_ref, p.inception, 64, False, p.reference_key)
    return {
        "images": n,
        "reference_images": len(x_ref),
        **{k: round(f[k], 4) for k in ("fid", "kid", "precision", "recall")},
        "inception_s": round(time.perf_counter() - t0, 1),
    }


def run(quick: bool = False) -> dict:
    import mlflow

    from infra import tracking
    from infra.cluster import ensure_ray
    from infra.devices import Resources
    from stages import evaluate, sample

    root = storage.join(".local/bench", "rejection")
    shutil.rmtree(root, ignore_errors=True)  # every rate sampled and evaluated afresh: timed
    per_class = 5 if quick else 50
    kept = per_class * 10
    ensure_ray()
    rows = []
    for rate in RATES:
        out = storage.join(root, f"rate-{rate:g}")
        t0 = time.perf_counter()
        s = sample.run(
            sample.SampleConfig(
                model_uri="models:/demo-gpt@champion",
                output_uri=storage.join(out, "samples"),
                samples_per_class=per_class,
                acceptance_rate=rate,
                classifier_uri=None if rate == 1.0 else storage.join(DEMO, "evaluation"),
                sampler=sample.SamplerOptions(
                    temperature=1.0, top_k=100, cfg_scale=2.0, cfg_schedule="linear"
                ),
                batch_size=64,
                resources=Resources(workers=2),
            ),
            "taming-bench",
        )
        sample_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        eval_cfg = evaluate.EvaluateConfig(
            generated_uri=s.output_uri,
            reference_uri=storage.join(DEMO, "images"),
            output_uri=storage.join(out, "evaluation"),
            max_images=kept,
            inception="required",
            resources=Resources(cpus_per_worker=2),
        )
        e = evaluate.run(eval_cfg, "taming-bench")
        evaluate_s = time.perf_counter() - t0
        report = json.loads(storage.read_bytes(e.manifest.data_uris()[0]))
        f = report["figures"]
        row = {
            "acceptance_rate": rate,
            "kept": kept,
            "candidates": round(kept / rate),
            "reference_images": report["counts"]["reference_images"],
            **{k: round(f[k], 4) for k in ("fid", "kid", "precision", "recall") if k in f},
            "classifier_score": round(f["classifier_score"], 4),
            "classifier_score_real": round(f["classifier_score_real"], 4),
            "kept_class_probability": round(s.figures.get("kept_class_probability", float("nan")), 4),
            "sample_s": round(sample_s, 1),
            "evaluate_s": round(evaluate_s, 1),
            "inception_s": round(report["timings_s"].get("inception", 0.0), 1),
        }
        rows.append(row)
        print(row, flush=True)
    floor = _real_floor(eval_cfg, kept)
    print(floor, flush=True)
    base = rows[0]
    for r in rows:
        r["fid_over_rate_1"] = round(r["fid"] / base["fid"], 3)
        r["sample_s_over_rate_1"] = round(r["sample_s"] / base["sample_s"], 2)
    tracking.set_experiment("taming-bench")
    with mlflow.start_run(run_name="rejection-tradeoff"):
        for i, r in enumerate(rows):
            tracking.log_metrics(
                {k: float(r[k]) for k in ("fid", "kid", "classifier_score", "sample_s") if k in r}, step=i
            )
        mlflow.log_figure(_plot(rows, floor), "rejection_tradeoff.png")
        mlflow.log_dict({"rows": rows, "real_test_images": floor}, "rejection_tradeoff.json")
    return {"generator": "models:/demo-gpt@champion", "rows": rows, "real_test_images": floor}
