"""The VQGAN training loss of Esser et al. (2021): L1 + perceptual (LPIPS, Zhang et al. 2018) +
PatchGAN adversarial loss with the adaptive weight on the decoder's last layer, plus the codebook
loss. Term names follow the official logs (``rec_loss``, ``p_loss``, ``nll_loss``, ``d_weight``,
``g_loss``, ``quant_loss``, ``total_loss``; ``disc_loss``, ``logits_real``, ``logits_fake``).

The perceptual term uses the ``lpips`` package (its v0.1 linear heads ship in the wheel). Its VGG16
trunk is not downloadable here: it is read from ``vgg16-397923af.pth`` in the torch hub cache or a
given path. With ``perceptual_weight > 0`` and no trunk, construction fails with a message naming
the file; with ``perceptual_weight == 0`` the log says the perceptual term is off.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lpips
import torch
import torch.nn.functional as F
from torch import nn

from models.discriminator import NLayerDiscriminator

log = logging.getLogger(__name__)

VGG16_FILE = "vgg16-397923af.pth"  # torchvision's ImageNet VGG16 weights


@dataclass(frozen=True)
class VQGANLossConfig:
    disc_start: int = 10_001  # generator steps before the adversarial terms switch on
    codebook_weight: float = 1.0
    pixel_weight: float = 1.0  # L1
    perceptual_weight: float = 1.0  # LPIPS; 0 switches it off (no VGG16 trunk needed)
    disc_weight: float = 0.8  # scales the adaptive weight
    disc_factor: float = 1.0
    disc_loss: Literal["hinge", "vanilla"] = "hinge"
    disc_num_layers: int = 3
    disc_in_channels: int = 3
    disc_ndf: int = 64
    log_inactive_gan_terms: bool = False  # compute g_loss / d_weight before disc_start (as official)


def find_vgg16(path: str | Path | None = None) -> Path | None:
    """The VGG16 trunk file: ``path`` if given (it must exist), else the torch hub cache's copy."""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(
                f"VGG16 weights for LPIPS not found at {p} (expected torchvision's {VGG16_FILE})"
            )
        return p
    cached = Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE
    return cached if cached.is_file() else None


def require_vgg16(path: str | Path | None = None, why: str = "the perceptual loss") -> Path:
    """:func:`find_vgg16`, or a FileNotFoundError that names the file and what to do."""
    trunk = find_vgg16(path)
    if trunk is None:
        raise FileNotFoundError(
            f"{why} needs the VGG16 trunk of LPIPS, {VGG16_FILE}, which cannot be downloaded here. Put it "
            f"at {Path(torch.hub.get_dir()) / 'checkpoints'}/ or pass its path (vgg16_path / the stage's "
            "vgg16_uri), or set perceptual_weight=0."
        )
    return trunk


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


class LPIPS(lpips.LPIPS):
    """``lpips.LPIPS(net="vgg")`` with its trunk read from a local file, always in eval mode.

    State-dict names are the lpips package's, which are also taming's (``net.slice*``, ``lin*``,
    ``scaling_layer``) plus the package's alias ``lins.*`` of the ``lin*`` heads.
    """

    def __init__(self, vgg16_path: Path | None):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            heads = Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"  # ships in the wheel
            super().__init__(net="vgg", pretrained=True, pnet_rand=True, model_path=str(heads), verbose=False)
        if vgg16_path is not None:
            self.load_vgg16(vgg16_path)
        self.requires_grad_(False)
        self.eval()

    def load_vgg16(self, path: Path) -> None:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        slices = [range(0, 4), range(4, 9), range(9, 16), range(16, 23), range(23, 30)]
        mapped = {}
        for s, idx in enumerate(slices, start=1):
            for i in idx:
                for kind in ("weight", "bias"):
                    if f"features.{i}.{kind}" in sd:
                        mapped[f"slice{s}.{i}.{kind}"] = sd[f"features.{i}.{kind}"]
        self.net.load_state_dict(mapped, strict=True)

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # a fixed metric: no dropout, whatever the parent's mode

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if x.shape[1] == 1:  # grey images (and depth maps) as RGB
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        return super().forward(x, y)  # (B, 1, 1, 1)


class VQGANLoss(nn.Module):
    def __init__(
        self,
        cfg: VQGANLossConfig | None = None,
        vgg16_path: str | Path | None = None,
        require_trunk: bool = True,
    ):
        """``require_trunk=False`` builds LPIPS with an empty trunk, to be filled from a checkpoint."""
        super().__init__()
        self.cfg = cfg = cfg or VQGANLossConfig()
        self.perceptual_mode = "off"
        if cfg.perceptual_weight > 0:
            why = f"perceptual_weight={cfg.perceptual_weight}"
            trunk = require_vgg16(vgg16_path, why) if require_trunk else find_vgg16(vgg16_path)
            self.perceptual_loss = LPIPS(trunk)
            self.perceptual_mode = (
                f"lpips-vgg16 ({trunk})" if trunk else "lpips-vgg16 (trunk from checkpoint)"
            )
        log.info("VQGAN loss: perceptual term %s", self.perceptual_mode)
        self.discriminator = NLayerDiscriminator(cfg.disc_in_channels, cfg.disc_ndf, cfg.disc_num_layers)
        self.d_loss_fn = hinge_d_loss if cfg.disc_loss == "hinge" else vanilla_d_loss

    def _disc_factor(self, global_step: int) -> float:
        return self.cfg.disc_factor if global_step >= self.cfg.disc_start else 0.0

    def _nll(self, x: torch.Tensor, xrec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rec = self.cfg.pixel_weight * (x - xrec).abs()
        if self.cfg.perceptual_weight > 0:
            p_loss = self.perceptual_loss(x, xrec)
            rec = rec + self.cfg.perceptual_weight * p_loss
        else:
            p_loss = torch.zeros((), device=x.device)
        return rec.mean(), rec.mean(), p_loss.mean()  # nll_loss, rec_loss, p_loss

    def adaptive_weight(
        self, nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor
    ) -> torch.Tensor:
        """||grad nll|| / ||grad g|| at the decoder's last layer, times disc_weight."""
        nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
        g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        d_weight = torch.clamp(nll_grads.norm() / (g_grads.norm() + 1e-4), 0.0, 1e4).detach()
        return d_weight * self.cfg.disc_weight

    def generator_loss(
        self,
        codebook_loss: torch.Tensor,
        x: torch.Tensor,
        xrec: torch.Tensor,
        global_step: int,
        last_layer: torch.Tensor | None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The autoencoder's step (official optimizer 0). ``last_layer=None``: no adaptive weight."""
        nll_loss, rec_loss, p_loss = self._nll(x, xrec)
        disc_factor = self._disc_factor(global_step)
        d_weight = torch.zeros((), device=x.device)
        if disc_factor == 0 and not self.cfg.log_inactive_gan_terms:
            # Before disc_start the GAN term is multiplied by zero: skip the discriminator forward
            # and the two extra backward passes of the adaptive weight (the official code runs them
            # to log g_loss and d_weight; ~20% of a small model's step).
            g_loss = torch.zeros((), device=x.device)
        else:
            g_loss = -self.discriminator(xrec).mean()
            if last_layer is not None and torch.is_grad_enabled():
                d_weight = self.adaptive_weight(nll_loss, g_loss, last_layer)
        loss = nll_loss + d_weight * disc_factor * g_loss + self.cfg.codebook_weight * codebook_loss.mean()
        logs = {
            "total_loss": loss,
            "quant_loss": codebook_loss.mean(),
            "nll_loss": nll_loss,
            "rec_loss": rec_loss,
            "p_loss": p_loss,
            "d_weight": d_weight,
            "disc_factor": torch.tensor(disc_factor),
            "g_loss": g_loss,
        }
        return loss, {k: v.detach() for k, v in logs.items()}

    def discriminator_loss(
        self, x: torch.Tensor, xrec: torch.Tensor, global_step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The discriminator's step (official optimizer 1)."""
        logits_real = self.discriminator(x.detach())
        logits_fake = self.discriminator(xrec.detach())
        d_loss = self._disc_factor(global_step) * self.d_loss_fn(logits_real, logits_fake)
        logs = {"disc_loss": d_loss, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()}
        return d_loss, {k: v.detach() for k, v in logs.items()}
