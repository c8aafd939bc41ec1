"""What verifying inputs against their manifest costs, on the demo's data (`make bench` `verify`).

- tokenize: each actor reads its whole image file anyway; verification adds the sha256 of those
  bytes. Measured: the file reads with and without the check, against the tokenize stage's time on
  the same images (the demo tokenizer's architecture, random weights).
- train_gpt: Ray Data reads the training code files without a hook for a digest, so the stage
  verifies them on the driver before training (``Manifest.verify``). Measured: that pass against
  the stage's training time (the demo's GPT, a short budget).

Ratios only: both sides ran on this machine in the same run.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path


def _reads(m, columns: list[str], repeats: int = 3) -> tuple[float, float]:
    """Seconds to read every data file's ``columns`` plainly, and with the manifest check: the
    best of ``repeats`` alternating passes after a warm-up (the OS cache warm for both sides)."""
    from infra import stage, storage

    uris = list(zip(m.data_uris(), m.files))

    def plain() -> float:
        t0 = time.perf_counter()
        for uri, _ in uris:
            storage.read_parquet(uri, columns)
        return time.perf_counter() - t0

    def checked() -> float:
        t0 = time.perf_counter()
        for uri, f in uris:
            stage.read_file(uri, f, columns)
        return time.perf_counter() - t0

    plain()  # warm-up
    times = [(plain(), checked()) for _ in range(repeats)]
    return min(t[0] for t in times), min(t[1] for t in times)


def run(quick: bool = False) -> dict:
    from infra.cluster import ensure_ray
    from infra.devices import Resources
    from models import checkpoint
    from models.vqgan import VQGAN, preset
    from stages import tokenize_images, train_gpt
    from tests.bench.data import fashion_mnist_shards

    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ensure_ray()
        images = fashion_mnist_shards(tmp, 4_000 if quick else 20_000, 2_000)
        tok = tmp / "tok.safetensors"
        checkpoint.save_native(VQGAN(preset("f4-small", channels=1)), tok)
        t0 = time.perf_counter()
        codes = tokenize_images.run(
            tokenize_images.TokenizeConfig(
                images_uri=images.output_uri,
                tokenizer_uri=str(tok),
                output_uri=str(tmp / "codes"),
                resources=Resources(workers=2),
            ),
            "bench",
        )
        stage_s = time.perf_counter() - t0
        plain, checked = _reads(images.manifest, ["image_id", "image", "label", "split"])
        out["tokenize"] = {
            "images": codes.counts["images"],
            "stage_s": round(stage_s, 2),
            "reads_plain_s": round(plain, 3),
            "reads_verified_s": round(checked, 3),
            "verification_share_of_stage": round((checked - plain) / stage_s, 4),
        }
        print(out, flush=True)
        steps = 30 if quick else 100
        cfg = train_gpt.TrainGPTConfig(
            codes_uri=codes.output_uri,
            output_uri=str(tmp / "gpt"),
            steps=steps,
            batch_size=64,
            log_every=10,
            val_every=0,
            sample_every=0,
            checkpoint_every=10_000,
        )
        t0 = time.perf_counter()
        codes.manifest.verify("train")
        verify_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = train_gpt.run(cfg, "bench")
        train_s = time.perf_counter() - t0
        out["train_gpt"] = {
            "rows": res.counts["train_rows"],
            "steps": steps,
            "stage_s": round(train_s, 2),
            "verify_s": round(verify_s, 3),
            "verification_share_of_stage": round(verify_s / train_s, 4),
        }
    return out
