"""What both trainers share (``models.vqgan_training``, ``models.gpt_training``): the learning-rate
schedule, the gradient all-reduce across Ray Train workers (gloo and NCCL alike), and the EMA of
the weights.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Schedule:
    """Linear warm-up to ``lr``, then (optionally) a half-cosine down to ``floor * lr`` at ``steps``."""

    lr: float = 2e-4
    steps: int = 1500
    warmup_steps: int = 0
    cosine_decay: bool = False
    floor: float = 0.1

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if not self.cosine_decay:
            return self.lr
        t = min(1.0, (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps))
        return self.lr * (self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * t)))


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def allreduce_grads(params) -> None:
    """Average the gradients of ``params`` over the process group (no-op in a single process)."""
    world = _world()
    if world > 1:
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world


@torch.no_grad()
def ema_update(ema: dict[str, torch.Tensor], model: nn.Module, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * weights`` for float tensors; others (counters) copied."""
    for k, v in model.state_dict().items():
        if v.dtype.is_floating_point:
            ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
        else:
            ema[k].copy_(v)


def shipped_copy(model: nn.Module, ema: dict[str, torch.Tensor] | None) -> nn.Module:
    """A copy of ``model`` in eval mode, with the ``ema`` weights when they are kept."""
    out = copy.deepcopy(model)
    if ema is not None:
        out.load_state_dict(ema)
    return out.eval()
