"""Vector quantizers for the VQGAN bottleneck.

- ``VectorQuantizer``: nearest-neighbour lookup as in VQ-VAE (van den Oord et al., 2017) and
  taming's ``VectorQuantizer2``. In compat mode (the default) it is numerically the official one,
  including the *legacy* loss every released taming model was trained with (beta on the codebook
  term instead of the commitment term). Modern options, all off by default:
  l2-normalised codes with a low-dimensional codebook and cosine lookup (ViT-VQGAN, Yu et al.
  2022; LlamaGen, Sun et al. 2024), EMA codebook updates (VQ-VAE-2), dead-code restart
  (Dhariwal et al. 2020, Jukebox) and k-means initialisation. Under ``torch.distributed`` all
  codebook statistics are all-reduced and restarts broadcast from rank 0, so every worker keeps an
  identical codebook.
- ``GumbelQuantizer``: taming's GumbelVQ (Gumbel-softmax relaxation, Jang et al. 2016); training
  samples with a straight-through hard Gumbel-softmax, inference encodes deterministically with the
  argmax of the logits.

Every forward reports usage statistics (perplexity, fraction of codes used in the batch, counts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class QuantizerConfig:
    kind: Literal["vq", "gumbel"] = "vq"
    beta: float = 0.25  # commitment weight
    legacy_loss: bool = True  # official form: beta weighs the codebook term (all released models)
    l2_norm: bool = False  # cosine lookup on l2-normalised codes (use with a small embed_dim, e.g. 8)
    ema_decay: float | None = None  # EMA codebook updates (e.g. 0.99) instead of the codebook loss
    dead_code_threshold: float = 0.0  # restart codes whose EMA use count falls below this (0: off)
    usage_decay: float = 0.99  # EMA decay of the per-code use counts that restarts look at
    kmeans_init: bool = False  # initialise the codebook by k-means on the first training batch
    kmeans_iters: int = 10
    kl_weight: float = 5e-4  # gumbel: weight of the KL to the uniform prior
    temperature: float = 1.0  # gumbel: softmax temperature during training


class QuantizeOutput(NamedTuple):
    quant: torch.Tensor  # (B, D, h, w), straight-through gradients to the encoder
    loss: torch.Tensor  # () codebook + commitment (or KL for gumbel)
    codes: torch.Tensor  # (B, h, w) int64
    perplexity: torch.Tensor  # () exp(entropy) of the batch's code histogram
    usage: torch.Tensor  # () fraction of the codebook used in the batch
    counts: torch.Tensor  # (codebook_size,) uses per code in the batch (accumulate over a split)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(t)
    return t


def _broadcast(t: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.broadcast(t, src=0)
    return t


def usage_stats(codes: torch.Tensor, codebook_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(perplexity, used fraction, counts) of a batch of codes."""
    counts = torch.bincount(codes.reshape(-1), minlength=codebook_size).float()
    p = counts / counts.sum().clamp_min(1)
    perplexity = torch.exp(-(p * torch.log(p + 1e-10)).sum())
    return perplexity, (counts > 0).float().mean(), counts


def kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Plain Lloyd k-means on rows of ``x`` (N, D); empty clusters keep their previous centre."""
    idx = torch.randint(0, x.shape[0], (k,), generator=generator, device="cpu").to(x.device)
    centres = x[idx].clone()
    for _ in range(iters):
        assign = torch.cdist(x, centres).argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        n = torch.bincount(assign, minlength=k).to(x.dtype)
        centres = torch.where(n[:, None] > 0, sums / n.clamp_min(1)[:, None], centres)
    return centres


class VectorQuantizer(nn.Module):
    def __init__(self, codebook_size: int, embed_dim: int, cfg: QuantizerConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or QuantizerConfig()
        self.codebook_size, self.embed_dim = codebook_size, embed_dim
        self.embedding = nn.Embedding(codebook_size, embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
        # Training-state buffers are non-persistent unless the option that needs them is on, so a
        # compat-mode state_dict has exactly the official keys.
        if cfg.ema_decay is not None:
            self.embedding.weight.requires_grad_(False)
            self.register_buffer("ema_cluster_size", torch.zeros(codebook_size))
            self.register_buffer("ema_embed_sum", self.embedding.weight.detach().clone())
        if cfg.dead_code_threshold > 0:
            self.register_buffer("usage_ema", torch.ones(codebook_size))
        if cfg.kmeans_init:
            self.register_buffer("initted", torch.tensor(False))

    def codebook(self) -> torch.Tensor:
        w = self.embedding.weight
        return F.normalize(w, dim=1) if self.cfg.l2_norm else w

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) -> quantized vectors (B, D, h, w)."""
        return F.embedding(codes, self.codebook()).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor) -> QuantizeOutput:
        b, d, h, w = z.shape
        zf = z.permute(0, 2, 3, 1).reshape(-1, d)  # (BHW, D)
        if self.cfg.l2_norm:
            zf = F.normalize(zf, dim=1)
        if self.training and self.cfg.kmeans_init and not bool(self.initted):
            self._kmeans_init(zf.detach())
        cb = self.codebook()
        dist2 = zf.pow(2).sum(1, keepdim=True) + cb.pow(2).sum(1) - 2 * zf @ cb.t()  # (BHW, K)
        codes = dist2.argmin(1)
        zq = F.embedding(codes, cb)
        perplexity, usage, counts = usage_stats(codes, self.codebook_size)
        if self.training:
            self._update_codebook(zf.detach(), codes, counts)

        commitment = F.mse_loss(zf, zq.detach())
        if self.cfg.ema_decay is not None:
            loss = self.cfg.beta * commitment  # the codebook itself follows the EMA
        else:
            codebook_term = F.mse_loss(zq, zf.detach())
            if self.cfg.legacy_loss:
                loss = commitment + self.cfg.beta * codebook_term
            else:
                loss = self.cfg.beta * commitment + codebook_term
        if zf.requires_grad:
            zq = zf + (zq - zf).detach()  # straight-through estimator (inference keeps zq exact)
        quant = zq.reshape(b, h, w, d).permute(0, 3, 1, 2).contiguous()
        return QuantizeOutput(quant, loss, codes.reshape(b, h, w), perplexity, usage, counts)

    @torch.no_grad()
    def _kmeans_init(self, zf: torch.Tensor) -> None:
        centres = kmeans(zf, self.codebook_size, self.cfg.kmeans_iters)
        _broadcast(centres)
        self.embedding.weight.data.copy_(centres)
        if self.cfg.ema_decay is not None:
            self.ema_embed_sum.copy_(centres)
            self.ema_cluster_size.fill_(1.0)
        self.initted.fill_(True)

    @torch.no_grad()
    def _update_codebook(self, zf: torch.Tensor, codes: torch.Tensor, counts: torch.Tensor) -> None:
        cfg = self.cfg
        if cfg.ema_decay is None and cfg.dead_code_threshold <= 0:
            return
        counts = _all_reduce(counts.clone())
        if cfg.ema_decay is not None:
            sums = _all_reduce(torch.zeros_like(self.ema_embed_sum).index_add_(0, codes, zf))
            self.ema_cluster_size.mul_(cfg.ema_decay).add_(counts, alpha=1 - cfg.ema_decay)
            self.ema_embed_sum.mul_(cfg.ema_decay).add_(sums, alpha=1 - cfg.ema_decay)
            n = self.ema_cluster_size.sum()
            eps = 1e-5
            smoothed = (self.ema_cluster_size + eps) / (n + self.codebook_size * eps) * n
            self.embedding.weight.data.copy_(self.ema_embed_sum / smoothed[:, None])
        if cfg.dead_code_threshold > 0:
            self.usage_ema.mul_(cfg.usage_decay).add_(counts, alpha=1 - cfg.usage_decay)
            dead = self.usage_ema < cfg.dead_code_threshold
            n_dead = int(dead.sum())
            if n_dead:
                # Restart dead codes on random encoder outputs of this batch (rank 0's, broadcast).
                pick = torch.randint(0, zf.shape[0], (n_dead,), device=zf.device)
                fresh = _broadcast(zf[pick].clone())
                self.embedding.weight.data[dead] = fresh
                self.usage_ema[dead] = 1.0
                if cfg.ema_decay is not None:
                    self.ema_embed_sum[dead] = fresh
                    self.ema_cluster_size[dead] = 1.0


class GumbelQuantizer(nn.Module):
    def __init__(
        self, in_channels: int, codebook_size: int, embed_dim: int, cfg: QuantizerConfig | None = None
    ):
        super().__init__()
        self.cfg = cfg or QuantizerConfig(kind="gumbel")
        self.codebook_size, self.embed_dim = codebook_size, embed_dim
        self.proj = nn.Conv2d(in_channels, codebook_size, 1)  # features -> code logits
        self.embed = nn.Embedding(codebook_size, embed_dim)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.proj(z)  # (B, K, h, w)

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return F.embedding(codes, self.embed.weight).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor) -> QuantizeOutput:
        logits = self.proj(z)
        if self.training:
            one_hot = F.gumbel_softmax(logits, tau=self.cfg.temperature, dim=1, hard=True)
            codes = one_hot.argmax(1)
            quant = torch.einsum("bnhw,nd->bdhw", one_hot, self.embed.weight)
        else:  # deterministic encoding: the most likely code
            codes = logits.argmax(1)
            quant = self.embed_codes(codes)
        qy = F.softmax(logits, dim=1)
        kl = self.cfg.kl_weight * torch.sum(qy * torch.log(qy * self.codebook_size + 1e-10), dim=1).mean()
        perplexity, usage, counts = usage_stats(codes, self.codebook_size)
        return QuantizeOutput(quant, kl, codes, perplexity, usage, counts)
