"""The sampler's options (``sample.sampler``), kept free of torch so that a dataset descriptor that
records them (``infra.image_shards.Generation``) reads without loading it; the sampling itself is
``models.sampling``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

_ADDED = {"taming.omit_default": True}


@dataclass(frozen=True)
class SamplerOptions:
    temperature: float = 1.0  # divides the logits (below 1: sharper)
    top_k: int | None = None  # draw among the k most likely codes (None: all)
    top_p: float | None = None  # nucleus: among the most likely codes up to this mass (None: all)
    cfg_scale: float | None = None  # classifier-free guidance (needs a model with a null condition)
    cfg_schedule: Literal["constant", "linear"] = "constant"  # linear: 1 at the first position -> cfg_scale
    greedy: bool = False  # argmax at every position (no randomness)
    window: Literal["exact", "strided"] = "exact"  # grids larger than the training grid: sliding window
    window_stride: int | None = None  # strided: positions per window move (None: a quarter window)
    # (the next two came later: at their defaults they are left out of an output's identity, by
    # infra.config.added_field's metadata key, written out as models/ imports no infra)
    steps: int = field(default=8, metadata=_ADDED)  # masked generators: parallel decoding passes
    choice_temperature: float = field(default=4.5, metadata=_ADDED)  # masked: noise on which codes are kept

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.cfg_scale is not None and self.cfg_scale < 0:
            raise ValueError(f"cfg_scale must be >= 0, got {self.cfg_scale}")
        if self.window_stride is not None and self.window_stride < 1:
            raise ValueError("window_stride must be >= 1")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.choice_temperature < 0:
            raise ValueError(f"choice_temperature must be >= 0, got {self.choice_temperature}")

    @property
    def effective_temperature(self) -> float:
        return 0.0 if self.greedy else self.temperature

    def guidance(self, steps: int) -> list[float] | None:
        """The guidance scale at each of ``steps`` positions (None: no guidance)."""
        s = self.cfg_scale
        if s is None:
            return None
        if self.cfg_schedule == "constant" or steps == 1:
            return [float(s)] * steps
        return [1.0 + (s - 1.0) * t / (steps - 1) for t in range(steps)]
