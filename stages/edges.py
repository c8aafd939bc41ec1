"""Edges: image shards -> image shards plus an edge map per image (structure-to-image conditioning).

No weights: OpenCV's Canny detector (``cv2.Canny`` with the L2 gradient norm, after a Gaussian blur
of ``sigma`` pixels; hysteresis thresholds ``low`` < ``high`` on that gradient, on the image's
0-255 grey levels), deterministic for the same image and parameters. Each output row is the input
row plus ``edges``: a 1-channel PNG at the image size, 255 on an edge and 0 elsewhere (the Image
feature: ``datasets`` and any viewer show it as a picture). The parameters are in the annotation
and the output's identity; the detector is ``models.conditions.canny``, which ``evaluate`` also
runs on generated images.

    python -m stages.edges images_uri=... output_uri=... low=50 high=150
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from infra import annotate, previews, stage, tracking
from infra.config import execution_field, input_field, output_field
from infra.devices import Resources

log = logging.getLogger(__name__)
STAGE = "edges"
HEADLINE = ("written", "rejected", "images_per_s")  # the figures a pipeline's summary shows for this stage
ENCODING = "PNG (L) at the image size: 255 on an edge, 0 elsewhere"


@dataclass(frozen=True)
class EdgesConfig:
    images_uri: str = input_field()  # committed image shards ("" = the pipeline's ingest output)
    output_uri: str = output_field()  # "" = derived by the pipeline from run.root_uri
    low: float = 50.0  # Canny's hysteresis thresholds on the L2 gradient of 0-255 grey levels
    high: float = 150.0  # (low: weak edges kept next to strong ones; high: strong edges)
    sigma: float = 1.0  # Gaussian blur before the gradient, in pixels (0: none)
    # execution only (not part of the identity)
    batch_size: int = execution_field(64)
    resources: Resources = execution_field(default_factory=Resources)  # workers: actors

    def __post_init__(self):
        if not 0 <= self.low < self.high:
            raise ValueError(f"edges: need 0 <= low < high, got low={self.low} high={self.high}")
        if self.sigma < 0:
            raise ValueError(f"edges.sigma must be >= 0, got {self.sigma}")


class EdgesWorker(annotate.AnnotateWorker):
    def __init__(self, out: stage.StageOutput, cfg: EdgesConfig, p: annotate.AnnotatePlan):
        super().__init__(out, p)
        self.cfg, self.batch_size = cfg, cfg.batch_size

    def annotate(self, x: np.ndarray) -> dict[str, list]:
        from infra.imaging import encode_png
        from models.conditions import canny, to_gray

        maps = canny(to_gray(x), self.cfg.low, self.cfg.high, self.cfg.sigma)
        return {"edges": [{"bytes": encode_png(m), "path": None} for m in maps]}


def plan(cfg: EdgesConfig) -> annotate.AnnotatePlan:
    """The image shards and the output's descriptor (the detector and its parameters), before any work."""
    import cv2

    params = {"low": cfg.low, "high": cfg.high, "sigma": cfg.sigma}
    return annotate.plan(
        STAGE,
        "edges",
        cfg.images_uri,
        f"opencv-canny ({cv2.__version__})",
        None,
        None,
        encoding=ENCODING,
        params=params,
    )


def run(cfg: EdgesConfig, experiment: str = tracking.DEFAULT_EXPERIMENT) -> stage.StageResult:
    """Run (or resume, or reuse) the edges stage."""
    return annotate.run(plan(cfg), cfg, EdgesWorker, previews.images, cfg.resources, experiment)


def main(argv: list[str] | None = None) -> stage.StageResult:
    from infra.cli import stage_main

    return stage_main(STAGE, EdgesConfig, __doc__, run, argv)


if __name__ == "__main__":
    main()
