"""What the stages log as images, in one place: a preview of what a stage wrote, reconstructions
beside their inputs, samples in rows (one per class or condition), real images beside generated
ones, per-class scores as a bar chart. Every function returns a uint8 image (H, W) or (H, W, 3) for
``infra.tracking.log_image``; :func:`infra.imaging.image_grid` tiles them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from infra import schemas, storage
from infra.imaging import (
    colorize,
    depth_maps,
    image_grid,
    label_colors,
    label_maps,
    png_to_array,
    to_uint8_images,
)

MAX_GRID_ROWS = 16  # at most this many classes / conditions in a grid, one row each
TILE = 96  # the side a grid cell is shown at: small images are enlarged to about this


def framed(
    cells: list[np.ndarray],
    ncol: int,
    *,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str | tuple[str, int]] | None = None,
    tile: int = TILE,
) -> np.ndarray:
    """Cells (uint8 (H, W[, C])) in ``ncol`` columns, each enlarged by a whole factor with nearest
    neighbour (a pixel stays a square pixel) to about ``tile`` px, the rows named on the left and
    the columns captioned on top (PIL's default font): a caption per column, or ``(caption, n)``
    centred over the next ``n`` columns."""
    from PIL import Image, ImageDraw, ImageFont

    side = max(max(c.shape[:2]) for c in cells)
    k = max(1, round(tile / side))
    big = [np.repeat(np.repeat(c, k, axis=0), k, axis=1) for c in cells]
    pad = max(2, k)
    grid = image_grid(big, ncol, pad=pad)
    if not row_labels and not col_labels:
        return grid
    font = ImageFont.load_default(size=14)
    img = Image.fromarray(grid).convert("RGB")
    left = int(8 + max(ImageDraw.Draw(img).textlength(t, font=font) for t in row_labels)) if row_labels else 0
    top = 22 if col_labels else 0
    canvas = Image.new("RGB", (img.width + left, img.height + top), "white")
    canvas.paste(img, (left, top))
    draw = ImageDraw.Draw(canvas)
    cell_h = max(c.shape[0] for c in big)
    cell_w = max(c.shape[1] for c in big)
    for r, text in enumerate(row_labels or []):
        draw.text(
            (4, top + pad + r * (cell_h + pad) + cell_h // 2), text, fill="black", font=font, anchor="lm"
        )
    c = 0
    for label in col_labels or []:
        text, n = label if isinstance(label, tuple) else (label, 1)
        x = left + pad + c * (cell_w + pad) + (n * cell_w + (n - 1) * pad) // 2
        draw.text((x, top // 2 + 1), text, fill="black", font=font, anchor="mm")
        c += n
    return np.asarray(canvas)


def images(pngs: Sequence[bytes], ncol: int = 8) -> np.ndarray:
    """Encoded images as a grid."""
    return image_grid([png_to_array(b) for b in pngs], ncol)


def depth(blobs: Sequence[bytes], ncol: int = 8) -> np.ndarray:
    """``depth`` column values ([-1, 1] maps) in a perceptual colour ramp."""
    return image_grid(conditions("depth", blobs), ncol)


def segmentation(blobs: Sequence[bytes], ncol: int = 8) -> np.ndarray:
    """``segmentation`` column values (label maps), a colour per label."""
    return image_grid(conditions("segmentation", blobs), ncol)


def reconstructions(x, xrec, labels: bool = False, ncol: int = 8) -> np.ndarray:
    """Inputs beside their reconstructions (torch, (N, C, H, W) in [-1, 1]), captioned; with
    ``labels`` the inputs are one-hot label maps (or logits), drawn in label colours."""
    import torch

    if labels:
        cells = [label_colors(t.argmax(0).cpu().numpy()) for p in zip(x, xrec) for t in p]
    else:
        cells = to_uint8_images(torch.stack([x, xrec], 1).flatten(0, 1))
    return framed(cells, ncol, col_labels=["original", "reconstructed"] * (ncol // 2))


def rows(
    groups: dict[Any, list[np.ndarray]],
    ncol: int,
    beside: list[np.ndarray] | None = None,
    after: list[np.ndarray] | None = None,
    names: Sequence[str] | None = None,
):
    """One row per group (in the dict's order), ``ncol`` images each (blank where a group has
    fewer), named by ``names`` on the left; ``beside``: one more image at the start of each row
    (a condition); ``after``: one at its end (the real image); the columns are captioned then."""
    cells: list[np.ndarray] = []
    width = ncol + (1 if beside is not None else 0)
    for k, ims in enumerate(groups.values()):
        row = ([beside[k]] if beside is not None else []) + ims[:ncol]
        cells += (
            row + [np.zeros_like(ims[0])] * (width - len(row)) + ([after[k]] if after is not None else [])
        )
    width += 1 if after is not None else 0
    captions: list[str | tuple[str, int]] | None = None
    if beside is not None or after is not None:
        captions = (["condition"] if beside is not None else []) + [("samples", ncol)]
        captions += ["real"] if after is not None else []
    return framed(cells, width, row_labels=names, col_labels=captions)


def gather(
    uris: Sequence[str], key: str | None, per_group: int, max_groups: int
) -> dict[Any, list[np.ndarray]]:
    """The first ``per_group`` images of each of the first ``max_groups`` values of column ``key``
    (all in one group when None) from image-shard files, read until the groups are full."""
    groups: dict[Any, list[np.ndarray]] = {}
    for uri in uris:
        if len(groups) >= max_groups and all(len(v) >= per_group for v in groups.values()):
            break
        t = storage.read_parquet(uri, ["image"] + ([key] if key else []))
        keys = t[key].to_pylist() if key else [None] * t.num_rows
        for k, png in zip(keys, schemas.image_bytes(t["image"])):
            if k not in groups and len(groups) >= max_groups:
                continue
            if len(groups.setdefault(k, [])) < per_group:
                groups[k].append(png_to_array(png))
    return groups


def conditions(column: str, values: Sequence[bytes]) -> list[np.ndarray]:
    """Values of an image-shard condition column as pictures: depth in the colour ramp, label maps
    in label colours, edges and low-resolution images as they are."""
    if column == "depth":
        return [colorize(m[0], -1.0, 1.0) for m in depth_maps(list(values))]
    if column == "segmentation":
        return [label_colors(m[0]) for m in label_maps(list(values))]
    return [png_to_array(b) for b in values]


def decoded_conditions(x) -> list[np.ndarray]:
    """Decoded condition maps (torch (N, C, H, W)): label maps (one-hot or logits) in label
    colours, depth in the colour ramp, images as they are."""
    if x.shape[1] > 3:
        return [label_colors(v.argmax(0).numpy()) for v in x]
    return [colorize(v[0].numpy(), -1.0, 1.0) if v.shape[0] == 1 else v.numpy() for v in x]


def real_beside_generated(
    x_ref, y_ref, x_gen, y_gen, classes: int, per: int = 6, names: Sequence[str] | None = None
) -> np.ndarray:
    """Rows: classes (named); left ``per`` real images, right ``per`` generated ones (uint8 torch
    (N, C, H, W)), captioned."""

    def hwc(im):  # uint8 (C, H, W) -> (H, W) or (H, W, 3)
        arr = im.permute(1, 2, 0).numpy()
        return arr[..., 0] if arr.shape[-1] == 1 else arr

    cells = []
    for cls in range(min(classes, MAX_GRID_ROWS)):
        for x, y in ((x_ref, y_ref), (x_gen, y_gen)):
            ims = [hwc(im) for im in x[y == cls][:per]]
            cells += ims + [np.zeros_like(hwc(x[0]))] * (per - len(ims))
    shown = min(classes, MAX_GRID_ROWS)
    labels = [names[c] if names and c < len(names) else str(c) for c in range(shown)]
    return framed(cells, 2 * per, row_labels=labels, col_labels=[("real", per), ("generated", per)])


def class_scores(per_class: dict[str, dict[str, Any]]) -> np.ndarray:
    """Per-class classifier scores (generated-trained vs real-trained) as a bar chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(per_class)
    gen = [per_class[n]["classifier_score"] or 0 for n in names]
    real = [per_class[n]["classifier_score_real"] or 0 for n in names]
    figure, ax = plt.subplots(figsize=(max(6, len(names) * 0.8), 3.5), dpi=100)
    pos = np.arange(len(names))
    ax.bar(pos - 0.2, real, 0.4, label="trained on real")
    ax.bar(pos + 0.2, gen, 0.4, label="trained on generated")
    ax.set_xticks(pos, names, rotation=45, ha="right")
    ax.set_ylabel("accuracy on real test images")
    ax.set_ylim(0, 1)
    ax.legend(loc="lower left", fontsize="small")
    figure.tight_layout()
    figure.canvas.draw()
    image = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
    plt.close(figure)
    return image
