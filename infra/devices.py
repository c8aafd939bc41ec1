"""What a stage's work asks of the cluster and where its model runs, decided in one place.

:class:`Resources` is the one vocabulary every stage's config uses (``<stage>.resources.workers``,
``.cpus_per_worker``, ``.gpus_per_worker``), whether its work runs on a Ray Data actor pool, as Ray
tasks or on Ray Train workers. Every actor and training worker calls :func:`placement` with it; it
sets torch's intra-op threads to the CPUs Ray reserved for the process (more threads than reserved
CPUs only fight each other), takes the GPU when one was asked for and is there, and resolves
``precision: auto`` to bf16 on GPU and fp32 on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Precision = Literal["auto", "fp32", "bf16"]


@dataclass(frozen=True)
class Resources:
    """What a stage's work asks Ray for. Execution only: never part of an output's identity."""

    # actors of a pool (each loads the model once), Ray Train workers, or Ray tasks in flight
    # (null: as many as the CPUs allow; tasks only)
    workers: int | None = 1
    cpus_per_worker: float = 1.0  # fractions are fine: 2 workers x 0.5 CPU leave room for Ray's reads
    gpus_per_worker: float = 0.0  # > 0: the worker takes a GPU (Ray Train: a whole one)

    def __post_init__(self):
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be >= 1 (or null), got {self.workers}")
        if self.cpus_per_worker < 0 or self.gpus_per_worker < 0:
            raise ValueError("cpus_per_worker and gpus_per_worker must be >= 0")

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    def describe(self) -> str:
        """``2 workers x 1 CPU`` (``+ 1 GPU``), for plan summaries."""
        n = "as many workers as fit" if self.workers is None else f"{self.workers} worker"
        n += "s" if self.workers not in (None, 1) else ""
        gpu = f" + {self.gpus_per_worker:g} GPU" if self.use_gpu else ""
        return f"{n} x {self.cpus_per_worker:g} CPU{gpu}"


@dataclass(frozen=True)
class Placement:
    device: str  # "cuda" or "cpu"
    dtype: object  # torch.float32 or torch.bfloat16: weights/inputs at inference, autocast in training
    threads: int

    @property
    def bf16(self) -> bool:
        import torch

        return self.dtype == torch.bfloat16


def placement(resources: Resources, precision: Precision = "auto") -> Placement:
    """Set up this process for a model: threads, device and dtype (see the module docstring)."""
    import torch

    threads = max(1, int(resources.cpus_per_worker))
    torch.set_num_threads(threads)
    device = "cuda" if resources.use_gpu and torch.cuda.is_available() else "cpu"
    bf16 = precision == "bf16" or (precision == "auto" and device == "cuda")
    return Placement(device, torch.bfloat16 if bf16 else torch.float32, threads)


CPU_BATCH_PIXELS = 32 * 1024  # fastest here: f16 at 256px one image, f4 at 32px 32 images (bench_tokenize)
GPU_BATCH_PIXELS = 64 * 256 * 256  # 64 images at 256px (not measured: no GPU session yet)


def auto_batch_size(height: int, width: int, device: str) -> int:
    """Images per forward pass when the config leaves it open: a pixel budget, not an image count.

    On CPU, small batches are faster (the activations stay in cache): with two 1-thread actors the
    f16 encoder ran 1.61 s/image at batch 1 and 2.5 s/image at batch 32; the demo tokenizer 610
    images/s at batch 32 and 390 at batch 256.
    """
    budget = GPU_BATCH_PIXELS if device == "cuda" else CPU_BATCH_PIXELS
    return int(min(1024, max(1, budget // max(1, height * width))))
