"""VQGAN quality on real data: Fashion-MNIST padded to 32x32, f4 (8x8 codes), 512 codes, batch 64,
1500 steps, then PSNR, SSIM and codebook usage on the 10k test images; our default recipe against
the official recipe in the same run (`python -m tests.bench quality`, ~35 min on 2 CPU cores).

- ours: ``stages.train_vqgan``'s defaults (preset ``f4-small``: l2-normalised 8-dim codes,
  dead-code restart; lr 1e-3 with warm-up, cosine decay and clipping; random flips) through the
  very step the stage runs on each Ray Train worker (:class:`models.vqgan_training.VQGANTrainer`); the
  GAN term is off within 1500 steps (``disc_start``), as in the official recipe below.
- official: the official taming modules (Encoder/Decoder with ch 32, ch_mult [1, 2, 2], one res
  block, no attention, z_channels = embed_dim = 32, ``VectorQuantizer2`` with its legacy loss),
  L1 + codebook loss, Adam 2e-4 (betas 0.5, 0.9): taming's VQGAN before ``disc_start`` without
  LPIPS (its VGG16 trunk is not available here).

Both train in this process on the same data order. Step time is measured afterwards in an
interleaved phase (``TIMING_STEPS`` steps per recipe, alternated, median of 3), so that it is not
skewed by whatever else ran during the long phase.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from infra.sources import FASHION_MNIST_URI as FASHION_MNIST

STEPS, BATCH, TIMING_STEPS = 1500, 64, 20


def fashion_mnist_32() -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) as (N, 1, 32, 32) float tensors in [-1, 1], 28x28 centred on black (ingest's pad)."""
    from infra.sources import read_idx

    def load(name: str) -> torch.Tensor:
        a = read_idx(f"{FASHION_MNIST}/{name}-images-idx3-ubyte.gz")
        x = np.zeros((len(a), 1, 32, 32), np.float32)
        x[:, 0, 2:30, 2:30] = a
        return torch.from_numpy(x / 127.5 - 1.0)

    return load("train"), load("t10k")


class OfficialRecipe:
    """The official modules trained with L1 + codebook loss, one Adam."""

    def __init__(self, lr: float = 2e-4):
        from taming.modules.diffusionmodules.model import Decoder, Encoder
        from taming.modules.vqvae.quantize import VectorQuantizer2

        dd = dict(
            double_z=False,
            z_channels=32,
            resolution=32,
            in_channels=1,
            out_ch=1,
            ch=32,
            ch_mult=[1, 2, 2],
            num_res_blocks=1,
            attn_resolutions=[],
            dropout=0.0,
        )

        class VQModel(torch.nn.Module):  # taming.models.vqgan.VQModel's encode/decode
            def __init__(self):
                super().__init__()
                self.encoder, self.decoder = Encoder(**dd), Decoder(**dd)
                self.quantize = VectorQuantizer2(512, 32, beta=0.25, legacy=True)
                self.quant_conv = torch.nn.Conv2d(32, 32, 1)
                self.post_quant_conv = torch.nn.Conv2d(32, 32, 1)

            def encode(self, x):
                quant, qloss, (_, _, codes) = self.quantize(self.quant_conv(self.encoder(x)))
                return quant, qloss, codes.reshape(x.shape[0], x.shape[2] // 4, x.shape[3] // 4)

            def decode(self, quant):
                return self.decoder(self.post_quant_conv(quant))

        self.model = VQModel()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=lr, betas=(0.5, 0.9))

    def train_step(self, x: torch.Tensor) -> None:
        self.model.train()
        quant, qloss, _ = self.model.encode(x)
        xrec = self.model.decode(quant)
        loss = (x - xrec).abs().mean() + qloss.mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def final_model(self):
        return self.model


class OurRecipe:
    """The stage's defaults: :func:`stages.train_vqgan.build_trainer` on the f4-small preset."""

    def __init__(self, steps: int, **overrides):
        from models.vqgan import preset
        from stages.train_vqgan import TrainVQGANConfig, build_trainer

        self.cfg = TrainVQGANConfig(steps=steps, batch_size=BATCH, **overrides)
        mcfg = preset(self.cfg.preset, channels=1, dead_code_threshold=self.cfg.dead_code_threshold)
        torch.manual_seed(self.cfg.seed)
        self.trainer = build_trainer(self.cfg, mcfg)
        self.gen = torch.Generator().manual_seed(self.cfg.seed)

    def train_step(self, x: torch.Tensor) -> None:
        from models.vqgan_training import hflip_

        if self.cfg.hflip:
            x = hflip_(x, self.gen)
        self.trainer.train_step(x)

    def final_model(self):
        return self.trainer.final_model()


def train(recipe, train_x: torch.Tensor, steps: int, seed: int = 0, label: str = "") -> float:
    """``steps`` steps on shuffled epochs of ``train_x``; returns seconds per step."""
    gen = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(len(train_x), generator=gen), 0
    t0 = time.perf_counter()
    for step in range(steps):
        if pos + BATCH > len(perm):
            perm, pos = torch.randperm(len(train_x), generator=gen), 0
        recipe.train_step(train_x[perm[pos : pos + BATCH]])
        pos += BATCH
        if label and (step + 1) % 250 == 0:
            rate = (time.perf_counter() - t0) / (step + 1)
            print(f"  {label}: step {step + 1}/{steps} ({rate:.2f} s/step)", flush=True)
    return (time.perf_counter() - t0) / steps


def run(quick: bool = False, ours: dict | None = None) -> dict:
    from models.vqgan_training import evaluate
    from tests.bench.reference import import_taming

    torch.set_num_threads(max(1, torch.get_num_threads()))
    steps = 100 if quick else STEPS
    train_x, test_x = fashion_mnist_32()
    if quick:
        test_x = test_x[:1000]
    out: dict = {"steps": steps, "batch": BATCH, "data": "Fashion-MNIST 32x32 (padded), test split"}
    recipes = {"ours": lambda: OurRecipe(steps, **(ours or {}))}
    if import_taming():
        recipes["official"] = lambda: OfficialRecipe()
    else:
        out["official"] = "reference taming code missing (see tests/bench/reference.py)"
    for name, make in recipes.items():
        torch.manual_seed(0)
        recipe = make()
        sec = train(recipe, train_x, steps, label=name)
        metrics = evaluate(recipe.final_model(), test_x, 512)
        out[name] = {
            "test_psnr_db": round(metrics["psnr"], 2),
            "test_ssim": round(metrics["ssim"], 4),
            "codebook_usage": round(metrics["codebook_usage"], 4),
            "codes_used": int(round(metrics["codebook_usage"] * 512)),
            "s_per_step_long_phase": round(sec, 3),
        }
        print(f"{name}: {out[name]}")
    # step time, interleaved, on fresh models (the long phase may have shared the CPU)
    times: dict[str, list[float]] = {n: [] for n in recipes}
    live = {n: make() for n, make in recipes.items()}
    for n in live:  # warm-up
        train(live[n], train_x, 2)
    for _ in range(3):
        for n in live:
            times[n].append(train(live[n], train_x, TIMING_STEPS))
    for n in live:
        out[n]["s_per_step"] = round(statistics.median(times[n]), 3)
    if "official" in live:
        ratio = out["ours"]["s_per_step"] / out["official"]["s_per_step"]
        out["step_time_ours_over_official"] = round(ratio, 3)
    return out
