"""Low resolution: image shards -> image shards plus a low-resolution copy of each image (the paper's
stochastic super-resolution conditioning).

No weights: each image is averaged over ``factor`` x ``factor`` blocks (a box filter, exact: the
image side must be a multiple of the factor; what ``area`` resizing gives at an integer factor) and
stored back at the image size, each block one colour, so a condition tokenizer of the image
tokenizer's downsampling sees the same grid as the image codes (a code per block at f = factor).
Each output row is the input row plus ``lowres``: a PNG with the image's channels (the Image
feature: ``datasets`` and any viewer show the pixelated picture). ``models.conditions.degrade`` is
the one degradation: ``evaluate``'s consistency figure applies the same to generated images.

    python -m stages.lowres images_uri=... output_uri=... factor=4
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from infra import annotate, previews, stage, tracking
from infra.config import execution_field, input_field, output_field
from infra.devices import Resources
from infra.stage import InputError

log = logging.getLogger(__name__)
STAGE = "lowres"
HEADLINE = ("written", "rejected", "images_per_s")  # the figures a pipeline's summary shows for this stage


@dataclass(frozen=True)
class LowresConfig:
    images_uri: str = input_field()  # committed image shards ("" = the pipeline's ingest output)
    output_uri: str = output_field()  # "" = derived by the pipeline from run.root_uri
    factor: int = 4  # side of the averaged blocks: 32x32 -> 8x8 of information at 4
    # execution only (not part of the identity)
    batch_size: int = execution_field(64)
    resources: Resources = execution_field(default_factory=Resources)  # workers: actors

    def __post_init__(self):
        if self.factor < 2:
            raise ValueError(f"lowres.factor must be >= 2, got {self.factor}")


class LowresWorker(annotate.AnnotateWorker):
    def __init__(self, out: stage.StageOutput, cfg: LowresConfig, p: annotate.AnnotatePlan):
        super().__init__(out, p)
        self.cfg, self.batch_size = cfg, cfg.batch_size
        self.channels = p.dataset.channels

    def annotate(self, x: np.ndarray) -> dict[str, list]:
        from infra.imaging import encode_png
        from models.conditions import degrade

        u8 = np.rint((np.clip(x[:, : self.channels], -1, 1) + 1) * 127.5).astype(np.uint8)
        low = degrade(u8, self.cfg.factor).transpose(0, 2, 3, 1)
        return {
            "lowres": [{"bytes": encode_png(m[..., 0] if m.shape[-1] == 1 else m), "path": None} for m in low]
        }


def plan(cfg: LowresConfig) -> annotate.AnnotatePlan:
    """The image shards and the output's descriptor (the factor), before any work; an image side
    that is not a multiple of the factor fails here."""
    p = annotate.plan(
        STAGE,
        "lowres",
        cfg.images_uri,
        f"box filter {cfg.factor}x{cfg.factor}",
        None,
        None,
        encoding=f"PNG at the image size, each {cfg.factor}x{cfg.factor} block the mean of the image's",
        params={"factor": cfg.factor},
    )
    h, w = p.dataset.size
    if h % cfg.factor or w % cfg.factor:
        raise InputError(f"lowres.factor={cfg.factor}: {cfg.images_uri} holds {h}x{w} images, not a multiple")
    return p


def run(cfg: LowresConfig, experiment: str = tracking.DEFAULT_EXPERIMENT) -> stage.StageResult:
    """Run (or resume, or reuse) the lowres stage."""
    return annotate.run(plan(cfg), cfg, LowresWorker, previews.images, cfg.resources, experiment)


def main(argv: list[str] | None = None) -> stage.StageResult:
    from infra.cli import stage_main

    return stage_main(STAGE, LowresConfig, __doc__, run, argv)


if __name__ == "__main__":
    main()
