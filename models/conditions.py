"""The weight-free spatial conditions and how faithful a generated image is to one: pure array code.

- edges: OpenCV's Canny detector on the image's grey levels (``canny``), the structure-to-image
  condition; ``edge_f1`` compares two edge maps.
- low resolution: the mean of each ``factor`` x ``factor`` block (``downsample``, a box filter:
  what ``area`` resizing gives at an integer factor), stored back at the image size with each block
  one colour (``degrade``), the stochastic super-resolution condition.

The ``edges`` and ``lowres`` stages write these; ``evaluate`` applies the very same functions to
generated images, so a condition and its fidelity figure can never disagree on the degradation.
"""

from __future__ import annotations

import numpy as np


def to_gray(x: np.ndarray) -> np.ndarray:
    """Float images (N, C, H, W) in [-1, 1] -> uint8 grey (N, H, W) (ITU-R 601 luma for RGB)."""
    u8 = np.rint((np.clip(x, -1, 1) + 1) * 127.5)
    if u8.shape[1] == 3:
        return np.rint(0.299 * u8[:, 0] + 0.587 * u8[:, 1] + 0.114 * u8[:, 2]).astype(np.uint8)
    return u8[:, 0].astype(np.uint8)


def canny(gray: np.ndarray, low: float, high: float, sigma: float) -> np.ndarray:
    """Canny edges (``cv2.Canny``, L2 gradient norm, after a Gaussian blur of ``sigma`` pixels) of
    uint8 grey images (N, H, W) -> uint8 (N, H, W), 255 on an edge; deterministic."""
    import cv2

    out = np.empty_like(gray)
    for i, g in enumerate(gray):
        if sigma > 0:
            g = cv2.GaussianBlur(g, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)
        out[i] = cv2.Canny(g, low, high, L2gradient=True)
    return out


def downsample(x: np.ndarray, factor: int) -> np.ndarray:
    """(N, C, H, W) -> (N, C, H / factor, W / factor) float64: the mean of each block."""
    n, c, h, w = x.shape
    if h % factor or w % factor:
        raise ValueError(f"the image side ({h}x{w}) is not a multiple of factor {factor}")
    return x.reshape(n, c, h // factor, factor, w // factor, factor).mean(axis=(3, 5))


def upsample(x: np.ndarray, factor: int) -> np.ndarray:
    """(N, C, h, w) -> (N, C, h * factor, w * factor), each value repeated over its block."""
    return np.repeat(np.repeat(x, factor, axis=2), factor, axis=3)


def degrade(u8: np.ndarray, factor: int) -> np.ndarray:
    """uint8 images (N, C, H, W) -> the stored low-resolution condition: block means, rounded, at
    the image size."""
    return upsample(np.rint(downsample(u8, factor)).astype(np.uint8), factor)


# --------------------------------------------------------------------------- fidelity to a condition


def edge_f1(pred: np.ndarray, target: np.ndarray, tolerance: int = 1) -> dict[str, float]:
    """Precision, recall and F1 of edge maps (N, H, W; nonzero = edge) against target maps, pooled
    over all pixels: a predicted edge pixel counts as correct within ``tolerance`` pixels (Chebyshev)
    of a target edge, a target edge as found within ``tolerance`` of a predicted one (the usual
    tolerance of edge benchmarks, here a square dilation)."""
    import cv2

    kernel = np.ones((2 * tolerance + 1, 2 * tolerance + 1), np.uint8)
    p, t = pred > 0, target > 0
    near_t = np.stack([cv2.dilate(m.astype(np.uint8), kernel) > 0 for m in t])
    near_p = np.stack([cv2.dilate(m.astype(np.uint8), kernel) > 0 for m in p])
    precision = float((p & near_t).sum() / max(p.sum(), 1))
    recall = float((t & near_p).sum() / max(t.sum(), 1))
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    return {"precision": precision, "recall": recall, "f1": f1}


def depth_errors(pred_disp: np.ndarray, gt_disp: np.ndarray, cap: float = 10.0) -> dict[str, float]:
    """MiDaS's evaluation of relative inverse depth (disparity): per image, the prediction is aligned
    to the target by least-squares scale and shift in disparity, clamped at 1 / (cap x the target's
    largest depth), and both are compared as depth: AbsRel (mean |d - d*| / d*) and the share of
    pixels with max(d / d*, d* / d) < 1.25 (delta1), averaged over images. ``gt_disp`` must be > 0."""
    absrel, delta1 = [], []
    for p, g in zip(pred_disp.reshape(len(pred_disp), -1), gt_disp.reshape(len(gt_disp), -1), strict=True):
        a = np.stack([p, np.ones_like(p)], 1).astype(np.float64)
        (scale, shift), *_ = np.linalg.lstsq(a, g.astype(np.float64), rcond=None)
        aligned = scale * p + shift
        depth_gt = 1.0 / g
        aligned = np.maximum(aligned, 1.0 / (cap * depth_gt.max()))
        depth = 1.0 / aligned
        absrel.append(float(np.mean(np.abs(depth - depth_gt) / depth_gt)))
        delta1.append(float(np.mean(np.maximum(depth / depth_gt, depth_gt / depth) < 1.25)))
    return {"absrel": float(np.mean(absrel)), "delta1": float(np.mean(delta1))}


def segmentation_scores(pred: np.ndarray, target: np.ndarray, classes: int) -> dict[str, float]:
    """Pixel accuracy and mean IoU of label maps (N, H, W) over the whole set (one confusion matrix,
    as semantic image synthesis papers report), the mean over classes present in the targets."""
    p, t = pred.reshape(-1).astype(np.int64), target.reshape(-1).astype(np.int64)
    cm = np.bincount(t * classes + p, minlength=classes * classes).reshape(classes, classes)
    inter = np.diag(cm).astype(np.float64)
    union = cm.sum(0) + cm.sum(1) - inter
    present = cm.sum(1) > 0
    iou = inter[present] / np.maximum(union[present], 1)
    return {
        "pixel_accuracy": float(inter.sum() / max(cm.sum(), 1)),
        "miou": float(iou.mean()) if len(iou) else 0.0,
    }


def mean_pairwise_distance(groups: list[np.ndarray]) -> float:
    """Diversity of several samples per condition: the mean over conditions of the mean RMS
    distance between two of its samples (images (k, C, H, W) in [0, 1] per group; groups of one
    sample are skipped). 0 for a model that draws one image per condition."""
    per = []
    for g in groups:
        if len(g) < 2:
            continue
        flat = g.reshape(len(g), -1).astype(np.float64)
        d2 = ((flat[:, None] - flat[None]) ** 2).mean(-1)
        iu = np.triu_indices(len(g), 1)
        per.append(float(np.sqrt(d2[iu]).mean()))
    return float(np.mean(per)) if per else float("nan")
