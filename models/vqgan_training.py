"""One VQGAN training step, pure torch: the recipe that ``stages.train_vqgan`` runs on every Ray Train
worker and that the quality benchmark runs in-process.

- Images (``objective="image"``): the paper's two-optimizer step (L1 + LPIPS + codebook loss for
  the autoencoder, the PatchGAN hinge loss from ``disc_start`` on, the adaptive weight), see
  :class:`models.losses.VQGANLoss`.
- Segmentation maps (``objective="bce"``): taming's condition stage for one-hot label maps
  (``BCELossWithQuant``): binary cross-entropy of the decoder's logits against the one-hot input,
  plus the codebook loss; no discriminator.

Beyond the official code: warm-up + cosine learning-rate decay, gradient clipping, an EMA of the
weights, optional bf16 autocast, and gradients averaged across workers by an explicit all-reduce
(identical on gloo and NCCL; the quantizer keeps its codebook statistics identical across workers
itself).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from models.losses import VQGANLoss, VQGANLossConfig
from models.optim import Schedule, allreduce_grads, ema_update, shipped_copy
from models.vqgan import VQGAN


@dataclass(frozen=True)
class VQGANRecipe:
    """How a VQGAN learns: the optimizer schedule and the loss terms (the training budget, steps
    and batch size, is the caller's)."""

    lr: float = 1e-3  # peak, after warm-up (bench: 25.2 dB vs 23.2 dB at 2e-4 with this schedule)
    warmup_steps: int = 100  # linear warm-up from 0 to lr
    cosine_decay: bool = True  # half-cosine from lr down to min_lr_ratio * lr at the last step
    min_lr_ratio: float = 0.1  # the last step's lr, as a fraction of lr
    grad_clip: float | None = 1.0  # gradient norm clip (None: off)
    ema_decay: float | None = None  # EMA of the weights (the EMA model is the one validated and saved)
    perceptual_weight: float = 0.0  # LPIPS; needs its VGG16 trunk (vgg16-397923af.pth)
    disc_start: int = 1_000_000  # the step the PatchGAN starts at (the default: never, in short runs)
    disc_weight: float = 0.8  # the adversarial term's weight (times taming's adaptive weight)
    codebook_weight: float = 1.0  # the codebook and commitment loss's weight

    def schedule(self, steps: int) -> Schedule:
        return Schedule(self.lr, steps, self.warmup_steps, self.cosine_decay, self.min_lr_ratio)

    def loss_config(self, in_channels: int) -> VQGANLossConfig:
        """The image objective's loss (L1 + LPIPS + GAN + codebook) for ``in_channels`` images."""
        return VQGANLossConfig(
            disc_start=self.disc_start,
            disc_weight=self.disc_weight,
            codebook_weight=self.codebook_weight,
            perceptual_weight=self.perceptual_weight,
            disc_in_channels=in_channels,
            disc_num_layers=2,
        )


def bce_with_quant(
    codebook_loss: torch.Tensor, x: torch.Tensor, logits: torch.Tensor, codebook_weight: float = 1.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """taming's ``BCELossWithQuant``: BCE of the logits against the one-hot target + codebook loss."""
    bce = F.binary_cross_entropy_with_logits(logits, x)
    loss = bce + codebook_weight * codebook_loss.mean()
    return loss, {"total_loss": loss.detach(), "bce_loss": bce.detach(), "quant_loss": codebook_loss.detach()}


class VQGANTrainer:
    """Holds the model, the loss (with its discriminator), both optimizers and the EMA weights."""

    def __init__(
        self,
        model: VQGAN,
        loss: VQGANLoss | None,
        recipe: VQGANRecipe,
        steps: int,
        *,
        objective: Literal["image", "bce"] = "image",
        autocast_dtype: torch.dtype | None = None,
    ):
        if objective == "image" and loss is None:
            raise ValueError("the image objective needs a VQGANLoss")
        self.model, self.loss, self.recipe, self.objective = model, loss, recipe, objective
        self.schedule = recipe.schedule(steps)
        self.grad_clip, self.ema_decay, self.codebook_weight = (
            recipe.grad_clip,
            recipe.ema_decay,
            recipe.codebook_weight,
        )
        self.autocast_dtype = autocast_dtype
        self.opt_g = torch.optim.Adam(model.parameters(), lr=recipe.lr, betas=(0.5, 0.9))
        self.opt_d = (
            torch.optim.Adam(loss.discriminator.parameters(), lr=recipe.lr, betas=(0.5, 0.9))
            if objective == "image"
            else None
        )
        keep_ema = bool(recipe.ema_decay)
        self.ema = {k: v.detach().clone() for k, v in model.state_dict().items()} if keep_ema else None
        self.step = 0

    def _autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return torch.autocast(device.type, enabled=False)
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def train_step(self, x: torch.Tensor) -> tuple[dict[str, float], torch.Tensor]:
        """One step on a batch (this worker's part of it); returns float logs and the reconstruction."""
        lr = self.schedule(self.step)
        for g in self.opt_g.param_groups + (self.opt_d.param_groups if self.opt_d else []):
            g["lr"] = lr
        self.model.train()
        with self._autocast(x.device):
            out = self.model.encode_with_stats(x)
            xrec = self.model.decode(out.quant)
        xrec = xrec.float()
        if self.objective == "bce":
            g_loss, logs = bce_with_quant(out.loss, x, xrec, self.codebook_weight)
        else:
            g_loss, logs = self.loss.generator_loss(out.loss, x, xrec, self.step, self.model.last_layer)
        self.opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        allreduce_grads(self.model.parameters())
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.opt_g.step()
        if self.opt_d is not None and self.step >= self.loss.cfg.disc_start:
            d_loss, dlogs = self.loss.discriminator_loss(x, xrec, self.step)
            self.opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            allreduce_grads(self.loss.discriminator.parameters())
            self.opt_d.step()
            logs.update(dlogs)
        if self.ema is not None:
            ema_update(self.ema, self.model, self.ema_decay)
        self.step += 1
        floats = {k: float(v) for k, v in logs.items()}
        floats.update(lr=lr, codebook_usage=float(out.usage), perplexity=float(out.perplexity))
        return floats, xrec.detach()

    def final_model(self) -> VQGAN:
        """The model to validate and ship: the EMA weights when kept, else the trained ones (a copy)."""
        return shipped_copy(self.model, self.ema)

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "disc": self.loss.discriminator.state_dict() if self.loss is not None else None,
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict() if self.opt_d is not None else None,
            "ema": self.ema,
            "step": self.step,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if self.loss is not None and state.get("disc") is not None:
            self.loss.discriminator.load_state_dict(state["disc"])
        self.opt_g.load_state_dict(state["opt_g"])
        if self.opt_d is not None and state.get("opt_d") is not None:
            self.opt_d.load_state_dict(state["opt_d"])
        self.ema = {k: v.clone() for k, v in state["ema"].items()} if state.get("ema") else None
        self.step = int(state["step"])


def one_hot(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """(B, 1, H, W) or (B, H, W) integer labels -> (B, classes, H, W) float one-hot maps."""
    if labels.dim() == 4:
        labels = labels[:, 0]
    if labels.numel() and int(labels.max()) >= classes:
        raise ValueError(f"label {int(labels.max())} does not fit {classes} segmentation classes")
    return F.one_hot(labels.long(), classes).permute(0, 3, 1, 2).float()


def seg_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image pixel accuracy of the argmax of the decoded logits against (B, H, W) labels."""
    pred = logits.argmax(1)
    return {"pixel_accuracy": (pred == labels.long()).float().flatten(1).mean(1)}


def hflip_(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip each image of a batch horizontally with probability 1/2."""
    flip = torch.rand(x.shape[0], generator=generator, device="cpu").to(x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def random_crop(x: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """One random ``size`` x ``size`` window per image (the same offset for all channels)."""
    h, w = x.shape[-2:]
    if size >= h and size >= w:
        return x
    rows = torch.randint(0, h - size + 1, (x.shape[0],), generator=generator).tolist()
    cols = torch.randint(0, w - size + 1, (x.shape[0],), generator=generator).tolist()
    return torch.stack([x[i, :, r : r + size, c : c + size] for i, (r, c) in enumerate(zip(rows, cols))])


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    r, c = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return x[..., r : r + size, c : c + size]


def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    codebook_size: int,
    *,
    batch: int = 256,
    lpips: nn.Module | None = None,
    labels: torch.Tensor | None = None,
) -> dict[str, float]:
    """Reconstruction quality of ``model`` (``encode`` -> (quant, loss, codes), ``decode``) on ``x``.

    Images: mean PSNR, SSIM (and LPIPS when a perceptual network is given) of the clamped
    reconstructions. Segmentation (``labels`` (N, H, W) given, ``x`` their one-hot maps): pixel
    accuracy of the decoded argmax. Always: the fraction of the codebook used over all of ``x``.
    """
    from models.metrics import psnr, ssim
    from models.quantize import usage_stats

    sums: dict[str, float] = {}
    counts = torch.zeros(codebook_size)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for lo in range(0, len(x), batch):
            xb = x[lo : lo + batch]
            quant, _, codes = model.encode(xb)
            rec = model.decode(quant).float()
            counts += usage_stats(codes.cpu(), codebook_size)[2]
            if labels is not None:
                per = seg_metrics(rec, labels[lo : lo + batch])
            else:
                rec = rec.clamp(-1, 1)
                per = {"psnr": psnr(rec, xb), "ssim": ssim(rec, xb)}
                if lpips is not None:
                    per["lpips"] = lpips(xb, rec).flatten()
            for k, v in per.items():
                sums[k] = sums.get(k, 0.0) + float(v.sum())
    model.train(was_training)
    out = {k: v / len(x) for k, v in sums.items()}
    out["codebook_usage"] = float((counts > 0).float().mean())
    out["images"] = len(x)
    return out
