"""Where a stage's model runs: device, precision and CPU threads, decided in one place.

Every actor and training worker calls :func:`placement` with what the config asked for; it sets
torch's intra-op threads to the CPUs Ray reserved for the process (more threads than reserved CPUs
only fight each other), takes the GPU when one was asked for and is there, and resolves
``precision: auto`` to bf16 on GPU and fp32 on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Precision = Literal["auto", "fp32", "bf16"]


@dataclass(frozen=True)
class Placement:
    device: str  # "cuda" or "cpu"
    dtype: object  # torch.float32 or torch.bfloat16: weights/inputs at inference, autocast in training
    threads: int

    @property
    def bf16(self) -> bool:
        import torch

        return self.dtype == torch.bfloat16


def placement(num_cpus: float, num_gpus: float, precision: Precision = "auto") -> Placement:
    """Set up this process for a model: threads, device and dtype (see the module docstring)."""
    import torch

    threads = max(1, int(num_cpus))
    torch.set_num_threads(threads)
    device = "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"
    bf16 = precision == "bf16" or (precision == "auto" and device == "cuda")
    return Placement(device, torch.bfloat16 if bf16 else torch.float32, threads)
