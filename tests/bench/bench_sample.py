"""Generated datasets: the sample stage's images/s (sampling, decode and PNG encoding included).

1. The stage (a Ray Data actor pool: 2 actors x 1 CPU, see ``infra.pool`` on threads) against a
   bare single-process loop of the same work at the same batch using both CPUs:
   ``models.sampling.generate_codes`` + ``decode_tiles`` + PNG encoding (the Ray overhead; target at
   most 10%). The stage's time is its whole ``run`` call (checks, actor start-up, writing and
   committing the shards); its ``actor_images_per_s`` figure is one actor's rate while it works.
2. Ours (the same bare loop) against the official ``sample_with_past`` (minGPT
   ``forward_with_past``) + the official VQModel decode on the same weights, images/s including
   decode and PNG encoding, same batch and temperature, no top-k (the official top-k imports
   ``transformers``, not installed here), at two sizes: the demo's (4 x 128 class-conditional GPT on
   8x8 codes of 128, a 32-pixel f4 VQGAN) and a 12 x 512 GPT on 16x16 codes (64-pixel images).
3. On a GPU only (absolute numbers): a ``gpt-b``-size class-conditional model (12 x 768) on 16x16
   codes of 16384 with guidance, decoded by an f16 tokenizer at 256 px in bf16, PNG included:
   images/s per batch size.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from infra.devices import Resources
from infra.imaging import encode_png, encode_pngs, to_uint8_images
from models import checkpoint
from models.gpt import GPT, PRESETS
from models.net2net import GeneratorSpec, native_condition
from models.sampling import SamplerOptions, decode_tiles, generate_codes, sample_uniforms
from models.vqgan import VQGAN
from tests.bench.bench_vqgan import SMALL, OfficialVQ
from tests.bench.reference import import_taming

CLASSES = 10


def _models(tmp: Path, gpt_size: str = "gpt-demo", grid: int = 8):
    """The benchmark's generator (saved with its spec) and tokenizer, random weights."""
    from infra import storage

    torch.manual_seed(0)
    vq = VQGAN(SMALL).eval()
    k = SMALL.codebook_size
    cond, vocab = native_condition("class", k, 0.1, n_classes=CLASSES)
    tok_path = tmp / "tok.safetensors"
    checkpoint.save_native(vq, tok_path)
    spec = GeneratorSpec(cond, k, (grid, grid), str(tok_path), storage.file_sha256(tok_path), prefix_length=1)
    gpt = GPT(dataclasses.replace(PRESETS[gpt_size], vocab_size=vocab, block_size=spec.block_size)).eval()
    gen_path = tmp / "gen.safetensors"
    checkpoint.save_native(gpt, gen_path, {"stage": "train_gpt", "generator": spec.to_dict()})
    return gpt, vq, spec, str(gen_path)


def _bare(gpt, vq, spec, n: int, batch: int, opts: SamplerOptions) -> float:
    """Seconds for the stage's per-sample work in this process, at ``batch``."""
    h, w = spec.grid
    t0 = time.perf_counter()
    with torch.inference_mode():
        for lo in range(0, n, batch):
            idx = range(lo, min(lo + batch, n))
            labels = torch.tensor([i % CLASSES for i in idx])
            codes = generate_codes(gpt, spec, labels, sample_uniforms(0, idx, h * w), opts)
            [encode_png(im) for im in to_uint8_images(decode_tiles(vq, codes.reshape(-1, h, w)))]
    return time.perf_counter() - t0


def _official(gpt, vq, spec, n: int, batch: int, temperature: float) -> float:
    from tests.bench.bench_gpt import _official_gpt

    ref, sample_with_past = _official_gpt(gpt.config, gpt)
    off_vq = OfficialVQ(SMALL).eval()
    off_vq.load_state_dict(vq.state_dict(), strict=True)
    h, w = spec.grid
    k = spec.codebook_size
    t0 = time.perf_counter()
    with torch.no_grad():
        for lo in range(0, n, batch):
            b = min(batch, n - lo)
            c = (torch.arange(lo, lo + b) % CLASSES + k)[:, None]
            codes = sample_with_past(c, ref, h * w, temperature=temperature).clamp(max=k - 1)
            quant = off_vq.quantize.get_codebook_entry(codes.reshape(-1), (b, h, w, SMALL.embed_dim))
            x = off_vq.decode(quant)
            [encode_png(im) for im in to_uint8_images(x)]
    return time.perf_counter() - t0


def _against_official(gpt, vq, spec, n: int, batch: int) -> dict:
    opts = SamplerOptions()
    _bare(gpt, vq, spec, batch, batch, opts)  # warm-up
    _official(gpt, vq, spec, batch, batch, 1.0)
    ours, off = [], []
    for _ in range(2):  # interleaved
        ours.append(_bare(gpt, vq, spec, n, batch, opts))
        off.append(_official(gpt, vq, spec, n, batch, 1.0))
    ours_s, off_s = statistics.median(ours), statistics.median(off)
    return {
        "samples": n,
        "batch": batch,
        "ours_images_per_s": round(n / ours_s, 2),
        "official_images_per_s": round(n / off_s, 2),
        "ratio_ours_over_official": round(off_s / ours_s, 2),
    }


def cpu(quick: bool) -> dict:
    from infra.cluster import ensure_ray
    from stages import sample

    n, batch = (256, 32) if quick else (4096, 64)
    opts = SamplerOptions()
    cpus = os.cpu_count() or 1
    res: dict = {"model": "4 x 128 GPT, 8x8 codes of 128, class-conditional; f4 VQGAN 32 px"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["TAMING_LOCAL_DIR"] = str(tmp / "local")
        gpt, vq, spec, gen_uri = _models(tmp)
        ensure_ray()
        torch.set_num_threads(cpus)
        _bare(gpt, vq, spec, 2 * batch, batch, opts)  # warm-up
        bare, walls = [], []
        for rep in range(2):  # interleaved with the stage runs
            bare.append(_bare(gpt, vq, spec, n, batch, opts))
            cfg = sample.SampleConfig(
                model_uri=gen_uri,
                output_uri=str(tmp / f"out{rep}"),
                num_samples=n,
                batch_size=batch,
                samples_per_shard=n // 8,
                resources=Resources(workers=cpus, cpus_per_worker=1.0),
                seed=rep,
            )
            t0 = time.perf_counter()
            r = sample.run(cfg, "bench")
            walls.append(time.perf_counter() - t0)
            res.setdefault("stage_actor_images_per_s", []).append(round(r.figures["actor_images_per_s"], 1))
        bare_s, wall = statistics.median(bare), statistics.median(walls)
        res["stage"] = {"samples": n, "batch": batch, "actors": cpus, "cpus_per_actor": 1}
        res["bare_loop_images_per_s"] = round(n / bare_s, 1)
        res["stage_images_per_s"] = round(n / wall, 1)
        res["ray_overhead"] = round(wall / bare_s - 1, 3)
        have_ref = import_taming()
        res["reference"] = (
            "CompVis/taming-transformers" if have_ref else "missing (see tests/bench/reference.py)"
        )
        if have_ref:
            res["vs_official_demo_size"] = _against_official(gpt, vq, spec, 256 if quick else 1024, batch)
            (tmp / "big").mkdir()
            big = _models(tmp / "big", "gpt-12x512", 16)
            res["vs_official_12x512_256_tokens"] = {
                "model": "12 x 512 GPT, 16x16 codes of 128, class-conditional; f4 VQGAN 64 px",
                **_against_official(*big[:3], 8 if quick else 32, 4 if quick else 16),
            }
    print(res)
    return res


def gpu(quick: bool) -> dict | None:
    if not torch.cuda.is_available():
        return None
    from models.vqgan import PRESETS as VQ

    torch.manual_seed(0)
    k = 16384
    cond, vocab = native_condition("class", k, 0.1, n_classes=1000)
    spec = GeneratorSpec(cond, k, (16, 16), prefix_length=1)
    gcfg = dataclasses.replace(PRESETS["gpt-b"], vocab_size=vocab, block_size=spec.block_size)
    gpt = GPT(gcfg).cuda().to(torch.bfloat16).eval()
    vq = VQGAN(VQ["f16-16384"]).cuda().to(torch.bfloat16).eval()
    opts = SamplerOptions(cfg_scale=2.0, top_k=1000)
    out: dict = {
        "device": torch.cuda.get_device_name(),
        "model": "gpt-b 12x768, 16x16 codes, cfg 2, f16 256 px",
    }
    for batch in (64, 256) if quick else (64, 128, 256, 512):
        n = 2 * batch
        t0 = time.perf_counter()
        with torch.inference_mode():
            for lo in range(0, n, batch):
                idx = range(lo, lo + batch)
                labels = torch.tensor([i % 1000 for i in idx])
                u = sample_uniforms(0, idx, 256).cuda()
                codes = generate_codes(gpt, spec, labels, u, opts, tile=batch)
                x = decode_tiles(vq, codes.reshape(-1, 16, 16), tile=min(batch, 64))
                encode_pngs(to_uint8_images(x), os.cpu_count() or 1)
        torch.cuda.synchronize()
        out[f"batch_{batch}_images_per_s"] = round(n / (time.perf_counter() - t0), 1)
    print(out)
    return out


def run(quick: bool = False) -> dict:
    return {"cpu": cpu(quick), "gpu": gpu(quick) or "no GPU here: not measured"}
