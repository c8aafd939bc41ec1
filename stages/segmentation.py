"""Segmentation: image shards -> image shards plus a DeepLab v2 label map per image (the S-FLCKR /
COCO-Stuff conditioning).

The official pipeline of taming's ``scripts/extract_segmentation.py`` (DeepLab v2 ResNet-101 MSC,
COCO-Stuff-164k, 182 labels) on a Ray Data actor pool, batched over whole shards. Each output row
is the input row plus ``segmentation``: uint8 COCO-Stuff label ids at the image size (row-major
bytes); the label names are in the file metadata and the manifest. Weights come from
``weights_uri`` (local or ``s3://``) or the torch hub cache; a missing file is an error that
names it.

    python -m stages.segmentation images_uri=... output_uri=... weights_uri=/models/deeplabv2_....pth
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np

from infra import annotate, previews, stage, tracking
from infra.config import execution_field, input_field, output_field
from infra.devices import Resources, placement

log = logging.getLogger(__name__)
STAGE = "segmentation"
HEADLINE = ("written", "rejected", "images_per_s")  # the figures a pipeline's summary shows for this stage
WEIGHT_FILES = {
    "deeplabv2_cocostuff164k": "deeplabv2_resnet101_msc-cocostuff164k-100000.pth",  # taming's, 182 labels
    "torchvision_deeplabv3_voc": "deeplabv3_resnet101_coco-586e9e4e.pth",  # torchvision's enum, 21 labels
}


@dataclass(frozen=True)
class SegmentationConfig:
    images_uri: str = input_field()  # committed image shards ("" = the pipeline's ingest output)
    output_uri: str = output_field()  # "" = derived by the pipeline from run.root_uri
    # the network: taming's DeepLab-v2 on COCO-Stuff (182 labels), or torchvision's v3 on VOC (21)
    model: Literal["deeplabv2_cocostuff164k", "torchvision_deeplabv3_voc"] = "deeplabv2_cocostuff164k"
    weights_uri: str = input_field()  # the official release file; "" = <torch hub dir>/checkpoints/<its name>
    v3_resize: int = 520  # torchvision_deeplabv3_voc: shorter side fed to the network (its preset: 520)
    # execution only (not part of the identity)
    batch_size: int | None = execution_field(None)  # per forward; None: 1 on CPU (measured faster), 8 on GPU
    resources: Resources = execution_field(default_factory=Resources)  # workers: actors, a model each


class SegmentationWorker(annotate.AnnotateWorker):
    def __init__(self, out: stage.StageOutput, cfg: SegmentationConfig, p: annotate.AnnotatePlan):
        from models.deeplab import load_deeplab_v2, load_deeplab_v3_torchvision

        super().__init__(out, p)
        self.cfg = cfg
        self.place = placement(cfg.resources, "fp32")  # label maps: argmax of fp32 logits
        self.batch_size = cfg.batch_size or (8 if self.place.device == "cuda" else 1)
        v2 = cfg.model == "deeplabv2_cocostuff164k"
        load = load_deeplab_v2 if v2 else load_deeplab_v3_torchvision
        self.model = load(p.weights_path).to(self.place.device)

    def annotate(self, x: np.ndarray) -> dict[str, list]:
        import torch

        from models.deeplab import segment, segment_v3

        x = torch.from_numpy(x).to(self.place.device)
        with torch.inference_mode():
            if self.cfg.model == "deeplabv2_cocostuff164k":
                labels, _ = segment(self.model, x)
            else:
                labels, _ = segment_v3(self.model, x, self.cfg.v3_resize)
        return {"segmentation": [m.tobytes() for m in labels.cpu().numpy().astype(np.uint8)]}


def plan(cfg: SegmentationConfig) -> annotate.AnnotatePlan:
    """The image shards, the weights (by sha256) and the output's descriptor, before any work."""
    from models.deeplab import COCO_STUFF_LABELS, torchvision_deeplabv3_labels

    v2 = cfg.model == "deeplabv2_cocostuff164k"
    return annotate.plan(
        STAGE,
        "segmentation",
        cfg.images_uri,
        cfg.model,
        cfg.weights_uri,
        WEIGHT_FILES[cfg.model],
        encoding="uint8 label ids at the image size",
        labels=list(COCO_STUFF_LABELS if v2 else torchvision_deeplabv3_labels()),
    )


def run(cfg: SegmentationConfig, experiment: str = tracking.DEFAULT_EXPERIMENT) -> stage.StageResult:
    """Run (or resume, or reuse) the segmentation stage."""
    return annotate.run(plan(cfg), cfg, SegmentationWorker, previews.segmentation, cfg.resources, experiment)


def main(argv: list[str] | None = None) -> stage.StageResult:
    from infra.cli import stage_main

    return stage_main(STAGE, SegmentationConfig, __doc__, run, argv)


if __name__ == "__main__":
    main()
