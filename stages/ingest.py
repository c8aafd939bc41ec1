"""Ingest: raw images -> validated, uniformly sized image shards (the input of every later stage).

Sources: a local folder (recursive; ``root/<class>/<file>`` gives labels, ``root/<split>/<class>/
<file>`` also a split), an ``s3://`` prefix laid out the same way, Parquet files with an image-bytes
column, or the Fashion-MNIST IDX files. Every image is decoded with Pillow in a Ray Data step,
EXIF-oriented, converted to RGB or L, resized and centre-cropped (or padded) to ``resolution`` and
stored as PNG in Parquet shards with the columns of ``infra.schemas.IMAGE_SCHEMA``. Inputs that
cannot be used are written to ``_errors`` shards with the reason; ``read == written + rejected``
is checked, and the stage fails loudly if it does not hold.

Items are written in a fixed pseudo-random order (by a hash of their key, the path relative to the
source root), not in listing order: a class-per-folder source gives shards that mix the classes,
and ``max_images`` keeps a sample of every class rather than the first folders. The output's
identity covers the source listing (names, sizes, modification times or ETags), so files added to
a source folder are new work.

    python -m stages.ingest --config pipelines/configs/demo.yaml ingest.resolution=64
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from infra import config as config_lib
from infra import pool, schemas, sources, stage, storage, tracking
from infra.config import execution_field, input_field, output_field
from infra.imaging import DecodeSpec, Rejected, ResizeMode, decode, image_grid, png_to_array
from infra.stage import InputRef, ShardMarker, StageResult, StageRun

log = logging.getLogger(__name__)
STAGE = "ingest"
HEADLINE = ("written", "rejected", "images_per_s")  # the figures a pipeline's summary shows for this stage


@dataclass(frozen=True)
class IngestConfig:
    # folder, s3:// prefix, Parquet file/folder, or the Fashion-MNIST IDX folder ("" with
    # source_format fashion_mnist: the Debian package's, infra.sources.FASHION_MNIST_URI)
    source_uri: str = input_field()
    output_uri: str = (
        output_field()
    )  # where the image shards go ("" = derived by the pipeline from run.root_uri)
    source_format: sources.SourceFormat = "auto"
    image_column: str = "image"  # Parquet sources: the column with encoded image bytes
    label_column: str | None = "label"  # Parquet sources: an integer label column, if any
    resolution: int = 64
    channels: int = 3  # 3 -> RGB, 1 -> L (grayscale)
    resize: ResizeMode = "crop"  # crop: shorter side + centre crop; pad: fit inside, pad the rest
    pad_value: int = 0
    max_pixels: int = 89_478_485  # larger inputs are rejected as decompression bombs
    min_side: int = 8  # smaller inputs are rejected
    val_fraction: float = 0.05  # for sources without a split: share of images put in "val"
    max_images: int | None = None  # keep N items, a fixed pseudo-random sample across classes; quick runs
    rows_per_shard: int = 10_000
    # execution only (not part of the identity): how the work runs, not what it produces
    batch_size: int = execution_field(64)  # images fetched together (s3fs fetches a batch concurrently)
    num_cpus: float = execution_field(1.0)  # per shard task
    concurrency: int | None = execution_field(None)  # max shards in flight (None: as the CPUs allow)

    def __post_init__(self):
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.resolution < 1 or self.rows_per_shard < 1:
            raise ValueError("resolution and rows_per_shard must be positive")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")

    @property
    def decode_spec(self) -> DecodeSpec:
        return DecodeSpec(
            self.resolution, self.channels, self.resize, self.pad_value, self.max_pixels, self.min_side
        )

    @property
    def source(self) -> str:
        """The source location, with the Fashion-MNIST default filled in."""
        if self.source_uri:
            return self.source_uri
        if self.source_format == "fashion_mnist":
            return sources.FASHION_MNIST_URI
        raise config_lib.ConfigError("ingest.source_uri is not set")


def image_id(key: str, data: bytes) -> str:
    """Stable id of an image: its key (path relative to the source root) and its bytes."""
    h = hashlib.sha256(key.encode())
    h.update(b"\0")
    h.update(data)
    return h.hexdigest()[:32]


def _order(key: str) -> str:
    return hashlib.sha256(f"order:{key}".encode()).hexdigest()


def _split_of(iid: str, val_fraction: float) -> str:
    return "val" if int(iid[:8], 16) / 0xFFFFFFFF < val_fraction else "train"


def ingest_shard(
    index: int, item: dict[str, Any], cfg: IngestConfig, out: stage.StageOutput, metadata: dict[str, str]
) -> ShardMarker:
    """One Ray task: read, decode and write one whole shard (no image bytes pass through the driver)."""
    items = item["items"]
    rows: dict[str, list] = {k: [] for k in (*schemas.IMAGE_SCHEMA.names, "ok", "reason", "num_bytes")}
    for lo in range(0, len(items), cfg.batch_size):
        chunk = items[lo : lo + cfg.batch_size]
        for it, got in zip(chunk, sources.load_bytes(chunk, cfg.image_column)):
            row = _row(cfg, it, got)
            for k in rows:
                rows[k].append(row.get(k))
    tables = _shard_tables(pa.table(rows), metadata)
    return out.write_shard(index, tables, {"read": len(items)})


def _row(cfg: IngestConfig, item: dict[str, Any], got: tuple[bytes, bytes] | Exception) -> dict[str, Any]:
    row: dict[str, Any] = {"source_uri": item["source_uri"], "label": item["label"]}
    try:
        if isinstance(got, Exception):
            raise Rejected(f"cannot read: {type(got).__name__}: {got}")
        id_bytes, data = got
        row["num_bytes"] = len(data)
        img = decode(data, cfg.decode_spec)
        iid = image_id(item["key"], id_bytes)
        split = item["split"] or _split_of(iid, cfg.val_fraction)
        row.update(ok=True, image_id=iid, image=img.png, width=img.width, height=img.height, split=split)
    except Rejected as e:
        row.update(ok=False, reason=str(e))
    return row


def _shard_tables(rows: pa.Table, metadata: dict[str, str]) -> dict[str, pa.Table]:
    ok = rows.filter(pa.compute.equal(rows["ok"], True))
    bad = rows.filter(pa.compute.equal(rows["ok"], False))
    data = ok.select(schemas.IMAGE_SCHEMA.names).cast(schemas.with_metadata(schemas.IMAGE_SCHEMA, metadata))
    errors = bad.select(schemas.ERROR_SCHEMA.names).cast(schemas.ERROR_SCHEMA)
    return {"data": data, "_errors": errors}


def _preview(out: stage.StageOutput, markers: list[ShardMarker], n: int = 32) -> np.ndarray | None:
    for m in markers:
        if m.rows():
            t = storage.read_parquet(out.file_uri(m), ["image"]).slice(0, n)
            return image_grid([png_to_array(b) for b in t.column("image").to_pylist()])
    return None


def run(cfg: IngestConfig, experiment: str = tracking.DEFAULT_EXPERIMENT) -> StageResult:
    """Run (or resume, or reuse) the ingest stage."""
    listing = sources.list_items(cfg.source, cfg.source_format, cfg.label_column)
    job = StageRun(
        STAGE, cfg, cfg.output_uri, [InputRef.source("source", listing.root, listing.digest)], experiment
    )
    if (done := job.cached()) is not None:
        return done
    items = sorted(listing.items, key=lambda it: _order(it["key"]))[: cfg.max_images]
    n = cfg.rows_per_shard
    shards = [{"items": items[lo : lo + n]} for lo in range(0, max(1, len(items)), n)]
    log.info(
        "ingest: %d items from %s (%s) -> %d shards", len(items), listing.root, listing.format, len(shards)
    )
    metadata = {
        "taming.label_names": json.dumps(listing.label_names),
        "taming.channels": str(cfg.channels),
        "taming.resolution": str(cfg.resolution),
        "taming.identity": job.identity,
    }
    with job:
        markers, reused = pool.map_items(
            ingest_shard,
            (cfg, job.out, metadata),
            shards,
            job.out,
            concurrency=cfg.concurrency,
            num_cpus=cfg.num_cpus,
        )
        counts = stage.tally(STAGE, markers, expected=len(items))
        counts.update(shards=len(shards), reused_shards=reused)
        if (grid := _preview(job.out, markers)) is not None:
            tracking.log_image(grid, "previews/ingest_samples.png")
        if counts["rejected"]:
            tracking.log_dict(_reasons(job.out, markers), "rejected_reasons.json")
        return job.commit(
            markers,
            counts=counts,
            figures={"images_per_s": len(items) / max(job.seconds, 1e-9) if reused < len(shards) else 0.0},
            extra={
                "label_names": listing.label_names,
                "channels": cfg.channels,
                "resolution": cfg.resolution,
                "source_format": listing.format,
                "source_root": listing.root,
            },
        )


def _reasons(out: stage.StageOutput, markers: list[ShardMarker]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for m in markers:
        if m.rows("_errors"):
            for r in storage.read_parquet(out.file_uri(m, "_errors"), ["reason"]).column(0).to_pylist():
                key = r.split(":")[0]
                counts[key] = counts.get(key, 0) + 1
    return counts


def main(argv: list[str] | None = None) -> StageResult:
    from infra.cli import stage_main

    return stage_main(STAGE, IngestConfig, __doc__, run, argv)


if __name__ == "__main__":
    main()
