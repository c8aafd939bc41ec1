"""One GPT training step over code sequences, pure torch: the recipe that ``stages.train_gpt`` runs
on every Ray Train worker and that the quality benchmark runs in-process.

The model trains from codes, never from pixels: a batch is the condition prefix (B, Lc) and the
image codes (B, T) that the code shards already hold; the loss is the cross-entropy of the image
positions only (as taming's ``Net2NetTransformer``), reported in nats and bits per token.

Beyond the official recipe (AdamW betas (0.9, 0.95), weight decay on the Linear weights, constant
lr): linear warm-up and cosine decay (``models.optim.Schedule``), gradient clipping, an optional
EMA of the weights, optional bf16 autocast, taming's token corruption (``pkeep``: each input code is
replaced by a random code with probability 1 - pkeep; the targets stay the true codes), and
gradients averaged across workers by an explicit all-reduce (gloo and NCCL alike).

``objective="masked"`` trains the masked prior instead (:mod:`models.maskgit`: a bidirectional
model, the cosine-masked loss, label smoothing optional); :func:`masked_bits` is its validation
figure, bits per masked code at a fixed mask ratio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.gpt import GPT
from models.maskgit import masked_loss
from models.optim import Schedule, allreduce_grads, ema_update, shipped_copy

LN2 = math.log(2.0)
OBJECTIVES = ("autoregressive", "masked")  # the raster prior, or the masked one (models.maskgit)


@dataclass(frozen=True)
class GPTRecipe:
    """How the GPT learns: AdamW and its schedule, clipping, EMA, token corruption (the training
    budget, steps and batch size, is the caller's)."""

    lr: float | None = None  # peak, after warm-up; None: 4e-3 * 128 / n_embd (see peak_lr)
    warmup_steps: int = 100  # linear warm-up from 0 to lr
    min_lr_ratio: float = 0.0  # the cosine decay ends at this fraction of lr
    weight_decay: float = 0.1  # on the weights of Linear layers only
    beta1: float = 0.9  # AdamW's first-moment decay
    beta2: float = 0.95  # AdamW's second-moment decay
    grad_clip: float | None = 1.0  # gradient norm clip (None: off)
    ema_decay: float | None = None  # EMA of the weights (None: off)
    pkeep: float = 1.0  # share of input codes kept (taming's pkeep); the rest are random codes
    label_smoothing: float = 0.0  # masked objective: MaskGIT's option (0.1 in its paper)

    def __post_init__(self):
        if not 0 < self.pkeep <= 1:
            raise ValueError(f"pkeep must lie in (0, 1], got {self.pkeep}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")

    def peak_lr(self, n_embd: int) -> float:
        """``lr``, or the default that scales with the width: 4e-3 at 128 (the demo's), 1e-3 at 512."""
        return self.lr if self.lr is not None else 4e-3 * 128 / n_embd

    def schedule(self, steps: int, n_embd: int) -> Schedule:
        """Warm-up, then a cosine to ``min_lr_ratio * lr`` at ``steps``."""
        return Schedule(self.peak_lr(n_embd), steps, self.warmup_steps, True, self.min_lr_ratio)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on the matmul weights (every ``nn.Linear.weight``), none on
    embeddings, position embeddings, LayerNorms and biases (as minGPT's ``configure_optimizers``)."""
    decay = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if id(p) in decay], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) not in decay], "weight_decay": 0.0},
    ]


def corrupt(codes: torch.Tensor, pkeep: float, codebook_size: int, generator=None) -> torch.Tensor:
    """Each code replaced by a uniform random code with probability ``1 - pkeep``."""
    if pkeep >= 1.0:
        return codes
    keep = torch.rand(codes.shape, generator=generator, device="cpu").to(codes.device) < pkeep
    noise = torch.randint(0, codebook_size, codes.shape, generator=generator, device="cpu").to(codes.device)
    return torch.where(keep, codes, noise)


def image_logits(model: GPT, prefix: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) predicting each of the T image codes from the prefix and the codes before it."""
    seq = torch.cat([prefix, inputs], 1)[:, :-1]
    return model(seq)[:, prefix.shape[1] - 1 :]


def code_loss(model: GPT, prefix: torch.Tensor, codes: torch.Tensor, inputs: torch.Tensor | None = None):
    """Mean cross-entropy (nats) of the image codes; ``inputs``: the (corrupted) codes fed in."""
    logits = image_logits(model, prefix, codes if inputs is None else inputs)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), codes.reshape(-1))


@torch.no_grad()
def bits_per_token(
    model: GPT, prefix: torch.Tensor, codes: torch.Tensor, batch: int = 256, autocast_dtype=None
) -> float:
    """Mean bits per image token of ``codes`` given ``prefix`` (eval mode, no corruption)."""
    was_training = model.training
    model.eval()
    total = 0.0
    device = next(model.parameters()).device
    for lo in range(0, len(codes), batch):
        p, c = prefix[lo : lo + batch].to(device), codes[lo : lo + batch].to(device)
        with _autocast(device, autocast_dtype):
            total += float(code_loss(model, p, c)) * len(c)
    model.train(was_training)
    return total / max(1, len(codes)) / LN2


@torch.no_grad()
def masked_bits(
    model: GPT,
    prefix: torch.Tensor,
    codes: torch.Tensor,
    codebook_size: int,
    ratio: float,
    seed: int = 0,
    batch: int = 256,
    autocast_dtype=None,
) -> float:
    """A masked prior's validation figure (it has no exact likelihood): mean bits per masked code
    with ``ratio`` of every row masked, the positions drawn from ``seed`` (the same every call)."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for lo in range(0, len(codes), batch):
        p, c = prefix[lo : lo + batch].to(device), codes[lo : lo + batch].to(device)
        with _autocast(device, autocast_dtype):
            n = len(c) * max(1, math.ceil(ratio * c.shape[1]))
            total += float(masked_loss(model, p, c, codebook_size, gen, ratio=ratio)) * n
            count += n
    model.train(was_training)
    return total / max(1, count) / LN2


def step_generator(gen: torch.Generator, seed: int, rank: int, step: int) -> torch.Generator:
    """``gen`` reseeded for one (seed, rank, step): the condition dropout and corruption a step draws
    do not depend on where a run started, so a resumed run draws what an uninterrupted one would."""
    return gen.manual_seed(seed * 1_000_003 + rank * 7919 + step)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


class GPTTrainer:
    """The GPT, its AdamW, the schedule and the EMA weights; ``train_step`` is one global step."""

    def __init__(
        self,
        model: GPT,
        recipe: GPTRecipe,
        codebook_size: int,
        steps: int,
        *,
        autocast_dtype: torch.dtype | None = None,
        objective: str = "autoregressive",
    ):
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if (objective == "masked") != bool(model.config.bidirectional):
            raise ValueError(
                f"the {objective} objective needs a {'bi' if objective == 'masked' else ''}directional model"
            )
        self.model, self.recipe, self.codebook_size = model, recipe, codebook_size
        self.objective = objective
        self.schedule = recipe.schedule(steps, model.config.n_embd)
        self.autocast_dtype = autocast_dtype
        fused = {"fused": True} if next(model.parameters()).is_cuda else {}
        self.opt = torch.optim.AdamW(
            param_groups(model, recipe.weight_decay),
            lr=self.schedule.lr,
            betas=(recipe.beta1, recipe.beta2),
            **fused,
        )
        self.ema = (
            {k: v.detach().clone() for k, v in model.state_dict().items()} if recipe.ema_decay else None
        )
        self.step = 0

    def train_step(
        self, prefix: torch.Tensor, codes: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, float]:
        """One optimizer step on this worker's part of the batch: prefix (B, Lc), codes (B, T)."""
        lr = self.schedule(self.step)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.model.train()
        with _autocast(codes.device, self.autocast_dtype):
            if self.objective == "masked":
                loss = masked_loss(
                    self.model, prefix, codes, self.codebook_size, generator, self.recipe.label_smoothing
                )
            else:
                inputs = corrupt(codes, self.recipe.pkeep, self.codebook_size, generator)
                loss = code_loss(self.model, prefix, codes, inputs)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        allreduce_grads(self.model.parameters())
        clip = self.recipe.grad_clip or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.opt.step()
        if self.ema is not None:
            ema_update(self.ema, self.model, self.recipe.ema_decay)
        self.step += 1
        nats = float(loss.detach())  # this worker's share; the logged figure is rank 0's
        return {"loss": nats, "bits_per_token": nats / LN2, "lr": lr, "grad_norm": float(grad_norm)}

    def eval_model(self) -> GPT:
        """The weights to validate now: the EMA copy when kept, else the live model (no copy)."""
        return self.final_model() if self.ema is not None else self.model

    def final_model(self) -> GPT:
        """The model to validate and ship: the EMA weights when kept, else the trained ones (a copy)."""
        return shipped_copy(self.model, self.ema)

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "opt": self.opt.state_dict(),
            "ema": self.ema,
            "step": self.step,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.ema = {k: v.clone() for k, v in state["ema"].items()} if state.get("ema") else None
        self.step = int(state["step"])
