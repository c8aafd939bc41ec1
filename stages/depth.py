"""Depth: image shards -> image shards plus a MiDaS depth map per image (the D-RIN conditioning).

taming extracted depth with a single-GPU, batch-1 script; here a Ray Data actor pool runs the
official MiDaS weights over whole shards in batches (exact: a shard's images share one size).
Each output row is the input row plus ``depth`` (float16, little-endian, at the image size,
normalised per image to [-1, 1] as taming's depth datasets do), ``depth_min`` and ``depth_max``
(the raw relative inverse depth range). Weights come from ``weights_uri`` (local or ``s3://``) or
the torch hub cache; a missing file is an error that names it.

    python -m stages.depth images_uri=... output_uri=... weights_uri=/models/midas_v21_small_256.pt
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa

from infra import io, tracking
from infra.imaging import colorize, depth_maps, image_grid
from infra.shard_map import AnnotateWorker, run_annotate_stage

log = logging.getLogger(__name__)
STAGE = "depth"
WEIGHT_FILES = {
    "midas_v21_small_256": "midas_v21_small_256.pt",
    "midas_v21_384": "midas_v21_384.pt",
    "dpt_hybrid_384": "dpt_hybrid_384.pt",
    "dpt_large_384": "dpt_large_384.pt",
}


@dataclass(frozen=True)
class DepthConfig:
    images_uri: str = ""  # committed image shards ("" = the pipeline's ingest output)
    output_uri: str = ""  # "" = derived by the pipeline from run.root_uri
    # midas_v21_384 is taming's "MiDaS"; the DPT models are MiDaS v3
    model: Literal["midas_v21_small_256", "midas_v21_384", "dpt_hybrid_384", "dpt_large_384"] = (
        "midas_v21_small_256"
    )
    weights_uri: str = ""  # the official release file; "" = <torch hub dir>/checkpoints/<its name>
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    # execution only (not part of the config hash)
    batch_size: int | None = None  # per forward; None: 1 on CPU (batching measured slower), 16 on GPU
    concurrency: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0


EXECUTION_FIELDS = ("output_uri", "batch_size", "concurrency", "num_cpus", "num_gpus")


def encode_f16(maps: np.ndarray) -> list[bytes]:
    return [m.astype("<f2").tobytes() for m in maps]


def decode_f16(column: pa.Array | pa.ChunkedArray, h: int, w: int) -> np.ndarray:
    return np.stack([np.frombuffer(b, dtype="<f2").reshape(h, w) for b in column.to_pylist()])


class DepthWorker(AnnotateWorker):
    def __init__(self, out: io.StageOutput, cfg: DepthConfig, weights: str, metadata: dict[str, str]):
        import torch

        from models.checkpoint import MIDAS_MODELS, load_midas

        self.out, self.cfg, self.metadata = out, cfg, metadata
        torch.set_num_threads(max(1, int(cfg.num_cpus)))
        self.device = "cuda" if torch.cuda.is_available() and cfg.num_gpus > 0 else "cpu"
        self.batch_size = cfg.batch_size or (16 if self.device == "cuda" else 1)
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device == "cuda")
        self.dtype = torch.bfloat16 if bf16 else torch.float32
        self.model = load_midas(weights, cfg.model).to(self.device, self.dtype)
        self.target = MIDAS_MODELS[cfg.model][1]  # the official input size of this model

    def fields(self) -> list[pa.Field]:
        return [
            pa.field("depth", pa.binary()),
            pa.field("depth_min", pa.float32()),
            pa.field("depth_max", pa.float32()),
        ]

    def annotate(self, x: np.ndarray) -> dict[str, list]:
        import torch

        from models.midas import predict_depth

        with torch.inference_mode():
            d = predict_depth(self.model, torch.from_numpy(x).to(self.device, self.dtype), self.target)
            d = d.float().cpu().numpy()
        lo, hi = d.min(axis=(1, 2)), d.max(axis=(1, 2))
        norm = 2.0 * (d - lo[:, None, None]) / np.maximum(hi - lo, 1e-8)[:, None, None] - 1.0
        return {"depth": encode_f16(norm), "depth_min": lo.tolist(), "depth_max": hi.tolist()}


def _preview(t: pa.Table) -> np.ndarray:
    return image_grid([colorize(m[0], -1.0, 1.0) for m in depth_maps(t["depth"].to_pylist())])


def run(cfg: DepthConfig, experiment: str = tracking.DEFAULT_EXPERIMENT) -> tuple[io.Manifest, bool]:
    """Run (or resume, or reuse) the depth stage; returns its manifest and whether it was cached."""
    manifest, cached = run_annotate_stage(
        STAGE,
        cfg,
        DepthWorker,
        WEIGHT_FILES[cfg.model],
        exclude=EXECUTION_FIELDS,
        info={"encoding": "float16-le, per image normalised to [-1, 1]"},
        preview=_preview,
        experiment=experiment,
    )
    log.info("depth: %s %s", "reused" if cached else "committed", manifest.output_uri)
    return manifest, cached


def main(argv: list[str] | None = None) -> None:
    from infra.cli import stage_main

    stage_main(STAGE, DepthConfig, __doc__, run, argv)


if __name__ == "__main__":
    main()
