"""VQGAN encode/decode throughput (images/s), batch 16, on CPU: the official f16 config at 256x256
and a small config at 32x32; ours in fp32 and in bf16 + channels_last, against the official taming
modules with the same weights in the same run (interleaved repetitions, median)."""

from __future__ import annotations

import os
import statistics
import time

import torch

from models.vqgan import PRESETS, VQGAN, VQGANConfig
from tests.bench.reference import import_taming

SMALL = VQGANConfig(
    ch=32,
    ch_mult=(1, 2, 2),
    num_res_blocks=2,
    attn_resolutions=(8,),
    resolution=32,
    z_channels=32,
    embed_dim=16,
    codebook_size=128,
)


class OfficialVQ(torch.nn.Module):
    """The official modules wired as taming's VQModel.encode/decode."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        from taming.modules.diffusionmodules.model import Decoder, Encoder
        from taming.modules.vqvae.quantize import VectorQuantizer2

        dd = dict(
            double_z=False,
            z_channels=cfg.z_channels,
            resolution=cfg.resolution,
            in_channels=cfg.in_channels,
            out_ch=cfg.out_channels,
            ch=cfg.ch,
            ch_mult=list(cfg.ch_mult),
            num_res_blocks=cfg.num_res_blocks,
            attn_resolutions=list(cfg.attn_resolutions),
            dropout=0.0,
        )
        self.encoder, self.decoder = Encoder(**dd), Decoder(**dd)
        self.quantize = VectorQuantizer2(cfg.codebook_size, cfg.embed_dim, beta=0.25)
        self.quant_conv = torch.nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = torch.nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode(self, x):
        return self.quantize(self.quant_conv(self.encoder(x)))

    def decode(self, quant):
        return self.decoder(self.post_quant_conv(quant))


def _time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_config(name: str, cfg: VQGANConfig, size: int, batch: int, reps: int, have_ref: bool) -> dict:
    torch.manual_seed(0)
    ours = VQGAN(cfg).eval()
    fast = VQGAN(cfg).eval()
    fast.load_state_dict(ours.state_dict())
    fast = fast.to(torch.bfloat16).to(memory_format=torch.channels_last)
    x = torch.rand(batch, cfg.in_channels, size, size) * 2 - 1
    xb = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    impls = {"ours_fp32": (ours, x), "ours_bf16_cl": (fast, xb)}
    if have_ref:
        official = OfficialVQ(cfg).eval()
        official.load_state_dict(ours.state_dict(), strict=True)
        impls["official_fp32"] = (official, x)
    res: dict = {"config": name, "size": size, "batch": batch}
    with torch.inference_mode():
        quants = {k: m.encode(inp)[0] for k, (m, inp) in impls.items()}  # warm-up + outputs
        codes32 = ours.encode(x)[2]
        res["bf16_code_agreement"] = float((fast.encode(xb)[2] == codes32).float().mean())
        if have_ref:
            res["max_abs_diff_decode_vs_official"] = float(
                (ours.decode(quants["ours_fp32"]) - official.decode(quants["official_fp32"])).abs().max()
            )
        timings = {f"{k}_{op}": [] for k in impls for op in ("encode", "decode")}
        for _ in range(reps):  # interleaved, so drift in machine load hits all alike
            for k, (m, inp) in impls.items():
                timings[f"{k}_encode"].append(_time(lambda m=m, inp=inp: m.encode(inp), 1))
                q = quants[k]
                timings[f"{k}_decode"].append(_time(lambda m=m, q=q: m.decode(q), 1))
    for key, ts in timings.items():
        res[f"{key}_images_per_s"] = round(batch / statistics.median(ts), 2)
    if have_ref:
        for op in ("encode", "decode"):
            off = res[f"official_fp32_{op}_images_per_s"]
            res[f"ratio_{op}_ours_fp32_over_official"] = round(res[f"ours_fp32_{op}_images_per_s"] / off, 2)
            res[f"ratio_{op}_ours_bf16_over_official"] = round(
                res[f"ours_bf16_cl_{op}_images_per_s"] / off, 2
            )
    print(res)
    return res


def run(quick: bool = False) -> dict:
    torch.set_num_threads(os.cpu_count() or 1)
    have_ref = import_taming()
    batch = 4 if quick else 16
    out = {
        "reference": "CompVis/taming-transformers modules"
        if have_ref
        else "missing (see tests/bench/reference.py)",
        "threads": torch.get_num_threads(),
    }
    out["small_32"] = bench_config("small (ch32, f4)", SMALL, 32, batch, 5, have_ref)
    out["f16_256"] = bench_config("f16-1024", PRESETS["f16-1024"], 256, batch, 1 if quick else 2, have_ref)
    return out
