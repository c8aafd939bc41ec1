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

from infra import annotate, previews, stage, tracking
from infra.config import execution_field, input_field, output_field
from infra.devices import Precision, Resources, placement

log = logging.getLogger(__name__)
STAGE = "depth"
HEADLINE = ("written", "rejected", "images_per_s")  # the figures a pipeline's summary shows for this stage
WEIGHT_FILES = {
    "midas_v21_small_256": "midas_v21_small_256.pt",
    "midas_v21_384": "midas_v21_384.pt",
    "dpt_hybrid_384": "dpt_hybrid_384.pt",
    "dpt_large_384": "dpt_large_384.pt",
}
ENCODING = "float16-le at the image size, per image normalised to [-1, 1]"


@dataclass(frozen=True)
class DepthConfig:
    images_uri: str = input_field()  # committed image shards ("" = the pipeline's ingest output)
    output_uri: str = output_field()  # "" = derived by the pipeline from run.root_uri
    # midas_v21_384 is taming's "MiDaS"; the DPT models are MiDaS v3
    model: Literal["midas_v21_small_256", "midas_v21_384", "dpt_hybrid_384", "dpt_large_384"] = (
        "midas_v21_small_256"
    )
    weights_uri: str = input_field()  # the official release file; "" = <torch hub dir>/checkpoints/<its name>
    precision: Precision = "auto"  # auto: bf16 on GPU, fp32 on CPU
    # execution only (not part of the identity)
    batch_size: int | None = execution_field(None)  # per forward; None: 1 on CPU (measured faster), 16 on GPU
    resources: Resources = execution_field(default_factory=Resources)  # workers: actors, a model each


def encode_f16(maps: np.ndarray) -> list[bytes]:
    return [m.astype("<f2").tobytes() for m in maps]


def decode_f16(column: pa.Array | pa.ChunkedArray, h: int, w: int) -> np.ndarray:
    return np.stack([np.frombuffer(b, dtype="<f2").reshape(h, w) for b in column.to_pylist()])


class DepthWorker(annotate.AnnotateWorker):
    def __init__(self, out: stage.StageOutput, cfg: DepthConfig, p: annotate.AnnotatePlan):
        from models.midas import TRANSFORMS, load_midas

        super().__init__(out, p)
        self.place = placement(cfg.resources, cfg.precision)
        self.batch_size = cfg.batch_size or (16 if self.place.device == "cuda" else 1)
        self.model = load_midas(p.weights_path, cfg.model).to(self.place.device, self.place.dtype)
        self.spec = TRANSFORMS[cfg.model]  # the official input transform of this model

    def annotate(self, x: np.ndarray) -> dict[str, list]:
        import torch

        from models.midas import predict_depth

        with torch.inference_mode():
            image = torch.from_numpy(x).to(self.place.device, self.place.dtype)
            d = predict_depth(self.model, image, self.spec).float().cpu().numpy()
        lo, hi = d.min(axis=(1, 2)), d.max(axis=(1, 2))
        norm = 2.0 * (d - lo[:, None, None]) / np.maximum(hi - lo, 1e-8)[:, None, None] - 1.0
        return {"depth": encode_f16(norm), "depth_min": lo.tolist(), "depth_max": hi.tolist()}


def plan(cfg: DepthConfig) -> annotate.AnnotatePlan:
    """The image shards, the weights (by sha256) and the output's descriptor, before any work."""
    return annotate.plan(
        STAGE, "depth", cfg.images_uri, cfg.model, cfg.weights_uri, WEIGHT_FILES[cfg.model], encoding=ENCODING
    )


def run(cfg: DepthConfig, experiment: str = tracking.DEFAULT_EXPERIMENT) -> stage.StageResult:
    """Run (or resume, or reuse) the depth stage."""
    return annotate.run(plan(cfg), cfg, DepthWorker, previews.depth, cfg.resources, experiment)


def main(argv: list[str] | None = None) -> stage.StageResult:
    from infra.cli import stage_main

    return stage_main(STAGE, DepthConfig, __doc__, run, argv)


if __name__ == "__main__":
    main()
