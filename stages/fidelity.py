"""How faithful spatially conditioned samples are to their conditions: ``evaluate``'s condition figures.

A generated set from a spatially conditioned generator records, per row, the ``condition_image_id``
of the real image whose condition it was given; its lineage names the code shards of the
conditions, whose own input is the annotated image shards holding the condition column and the
real image. :func:`find` follows that lineage (before any work); :func:`figures` reads the
samples with their conditions and computes, with the same functions that made the conditions
(``models.conditions``):

- ``edges``: the generated image's Canny edges (the condition's parameters) against the condition's:
  precision, recall, F1 with a 1-pixel tolerance; ``f1_unpaired``: the same against another
  image's condition, the chance level.
- ``lowres``: consistency, the generated image degraded the same way against its condition (PSNR,
  SSIM), beside the same for a bicubic upsampling of the condition (the baseline a sampler must
  beat to add no inconsistency); PSNR/SSIM to the real image, for both.
- ``depth``: MiDaS (the weights that made the condition) on the generated image against the
  condition's depth, aligned in scale and shift as MiDaS evaluates: AbsRel and delta1. The
  condition's per-image normalised disparity in [-1, 1] is mapped to [0.1, 1.1] (depths from 0.91
  to 10: relative depth has no metric scale, this fixes one).
- ``segmentation``: DeepLab (the weights that made the condition) on the generated image against
  the condition's labels: pixel accuracy and mIoU.
- ``diversity``: the mean RMS distance between two samples of the same condition (images in
  [0, 1]), when a condition has several: a generator that copies one mode is faithful and dull.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from infra import code_shards, image_shards, model_store, schemas, stage
from infra.image_shards import Annotation, Generation
from infra.imaging import decode_column, pngs_to_array
from infra.stage import InputError, InputRef


@dataclass(frozen=True)
class ConditionSource:
    """The annotated image shards behind a generated set's spatial conditions."""

    column: str  # depth, segmentation, edges, lowres
    images_uri: str  # image shards holding the column and the real images
    annotation: Annotation
    channels: int  # of the images
    weights_path: str | None  # depth / segmentation: the network that made the condition


def _weights_of(m: stage.Manifest, stage_name: str) -> str | None:
    """The weights file of the ``stage_name`` output in the image lineage of ``m`` (its own or an
    earlier annotating stage's)."""
    while m.stage != stage_name:
        images = next((i for i in m.inputs if i.name == "images"), None)
        if images is None:
            return None
        m = stage.read_manifest(images.uri)
    w = next((i for i in m.inputs if i.name == "weights"), None)
    return w.uri if w is not None else None


def find(g: Generation) -> tuple[ConditionSource, InputRef] | None:
    """The condition source of a generated set (None: not spatially conditioned, or conditions
    that did not come from annotated image shards, such as a user's own maps)."""
    if g.condition != "spatial" or not g.conditions_uri or not g.conditions_column:
        return None
    conditions = stage.read_manifest(g.conditions_uri)
    if (conditions.dataset or {}).get("kind") in image_shards.KINDS:  # sampled from condition maps
        # an annotating stage's column beside its real images; a user's maps have no real image
        known = g.conditions_column in code_shards.CONDITION_SOURCES.values()
        column, images = (g.conditions_column, g.conditions_uri) if known else (None, None)
    else:
        column = code_shards.CONDITION_SOURCES.get(g.conditions_column)
        images = code_shards.images_uri(conditions)
    if column is None or images is None:
        return None
    m = stage.read_manifest(images)
    described = image_shards.describe(m)
    if column not in described.annotations:
        raise InputError(f"evaluate: {images}, the conditions' images, has no `{column}` column")
    weights = None
    if column in ("depth", "segmentation"):
        uri = _weights_of(m, column)
        if uri is None:
            raise InputError(f"evaluate: no {column} stage found in the lineage of {images}")
        weights = str(model_store.local_path(uri))
    src = ConditionSource(column, m.output_uri, described.annotations[column], described.channels, weights)
    return src, InputRef.output("conditions", m)


def _read(src: ConditionSource, generated_uri: str, n: int, seed: int) -> dict[str, Any]:
    """A seeded sample of <= n generated rows with their condition's values and real images."""
    gen = stage.read_committed_table(generated_uri, ["image", "condition_image_id"])
    if gen.num_rows > n:
        gen = gen.take(np.sort(np.random.default_rng(seed).choice(gen.num_rows, n, replace=False)))
    ids = gen["condition_image_id"].to_pylist()
    real = image_shards.rows_by_id(src.images_uri, ids, ["image", src.column])
    values = image_shards.column_values(real, src.column)
    return {
        "ids": ids,
        "gen": pngs_to_array(schemas.image_bytes(gen["image"]), src.channels),
        "real": pngs_to_array(schemas.image_bytes(real["image"]), src.channels),
        "cond": decode_column(src.column, values, src.channels),
    }


def figures(
    src: ConditionSource, generated_uri: str, n: int, seed: int, device: str = "cpu"
) -> dict[str, float]:
    """The condition-fidelity figures (``<column>/...``) and ``diversity`` of a generated set."""
    from models import conditions as c

    d = _read(src, generated_uri, n, seed)
    gen, real, cond = d["gen"], d["real"], d["cond"]
    out: dict[str, float] = {"images": float(len(gen))}
    k = src.column
    if k == "edges":
        p = src.annotation.params or {}
        edges = c.canny(c.to_gray(gen), p["low"], p["high"], p["sigma"])
        target = (cond[:, 0] > 0).astype(np.uint8)
        out.update({f"edges/{m}": v for m, v in c.edge_f1(edges, target).items()})
        if len(target) > 1:
            out["edges/f1_unpaired"] = c.edge_f1(np.roll(target, 1, axis=0), target)["f1"]
    elif k == "lowres":
        out.update(_lowres(gen, real, cond, int((src.annotation.params or {})["factor"])))
    elif k == "depth":
        out.update(_depth(src, gen, cond, device))
    elif k == "segmentation":
        out.update(_segmentation(src, gen, cond, device))
    groups: dict[str, list[int]] = {}
    for i, v in enumerate(d["ids"]):
        groups.setdefault(v, []).append(i)
    if any(len(g) > 1 for g in groups.values()):
        out["diversity"] = c.mean_pairwise_distance([(gen[g] + 1) / 2 for g in groups.values()])
    return out


def _lowres(gen: np.ndarray, real: np.ndarray, cond: np.ndarray, factor: int) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    from models import conditions as c
    from models.metrics import psnr, ssim

    def u8(x: np.ndarray) -> np.ndarray:
        return np.rint((x + 1) * 127.5).astype(np.uint8)

    def f(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))

    def unit(x: np.ndarray) -> torch.Tensor:  # uint8 -> [-1, 1]
        return f(x) / 127.5 - 1

    cond_u8 = u8(cond)
    low = f(c.downsample(cond_u8, factor)) / 127.5 - 1
    bicubic = F.interpolate(low, scale_factor=factor, mode="bicubic", align_corners=False).clamp(-1, 1)
    out = {}
    for name, x in (("", f(gen)), ("bicubic_", bicubic)):
        degraded = unit(c.degrade(u8(x.numpy()), factor))
        out[f"lowres/{name}consistency_psnr"] = float(psnr(degraded, unit(cond_u8)).mean())
        out[f"lowres/{name}consistency_ssim"] = float(ssim(degraded, unit(cond_u8)).mean())
        out[f"lowres/{name}psnr_to_real"] = float(psnr(x, f(real)).mean())
        out[f"lowres/{name}ssim_to_real"] = float(ssim(x, f(real)).mean())
    return out


def _depth(src: ConditionSource, gen: np.ndarray, cond: np.ndarray, device: str) -> dict[str, float]:
    import torch

    from models import conditions as c
    from models.midas import TRANSFORMS, load_midas, predict_depth

    model = load_midas(src.weights_path, src.annotation.model).to(device).eval()
    x = torch.from_numpy(gen if gen.shape[1] == 3 else np.repeat(gen, 3, axis=1))
    with torch.inference_mode():
        pred = torch.cat(
            [predict_depth(model, b.to(device), TRANSFORMS[src.annotation.model]) for b in x.split(16)]
        )
    gt = (cond[:, 0].astype(np.float64) + 1) / 2 + 0.1  # the normalised disparity in [0.1, 1.1]
    got = c.depth_errors(pred.float().cpu().numpy(), gt)
    return {"depth/absrel": got["absrel"], "depth/delta1": got["delta1"]}


def _segmentation(src: ConditionSource, gen: np.ndarray, cond: np.ndarray, device: str) -> dict[str, float]:
    import torch

    from models import conditions as c
    from models.deeplab import load_deeplab_v2, load_deeplab_v3_torchvision, segment, segment_v3

    v2 = src.annotation.model == "deeplabv2_cocostuff164k"
    model = (load_deeplab_v2 if v2 else load_deeplab_v3_torchvision)(src.weights_path).to(device).eval()
    x = torch.from_numpy(gen if gen.shape[1] == 3 else np.repeat(gen, 3, axis=1))
    with torch.inference_mode():
        labels = [
            (segment(model, b.to(device)) if v2 else segment_v3(model, b.to(device)))[0] for b in x.split(8)
        ]
    pred = torch.cat(labels).cpu().numpy()
    got = c.segmentation_scores(pred, cond[:, 0], len(src.annotation.labels or []) or int(cond.max()) + 1)
    return {"segmentation/pixel_accuracy": got["pixel_accuracy"], "segmentation/miou": got["miou"]}
