"""Image shards (ingest's output, and every stage's that keeps its rows: depth, segmentation,
sample): what a committed output of them holds, read the same way by every stage.

An image-shard output records ``channels``, ``resolution`` (the square side, or None) and
``label_names`` in its manifest's ``extra``; outputs that add columns to earlier image shards
(depth, segmentation) inherit them through their lineage, and ingest outputs committed before
``extra`` carried them fall back to their config.
"""

from __future__ import annotations

from typing import Any

from infra import stage

KEYS = ("channels", "resolution", "label_names")


def info(images: str | stage.Manifest) -> dict[str, Any]:
    """``channels`` (int or None), ``resolution`` (int or None) and ``label_names`` of image shards."""
    m = stage.read_manifest(images) if isinstance(images, str) else images
    out: dict[str, Any] = {}
    for key in KEYS:
        value, cur = None, m
        for _ in range(8):  # the nearest output of the lineage that records it
            value = cur.extra.get(key, cur.config.get(key) if key != "label_names" else None)
            ups = cur.upstream()
            if value is not None or not ups:
                break
            cur = ups[0]
        out[key] = value
    if out["channels"] is not None:
        out["channels"] = int(out["channels"])
    if out["resolution"] is not None:
        out["resolution"] = int(out["resolution"])
    return out
