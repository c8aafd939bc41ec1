"""Ingest: raw images -> validated, uniformly sized image shards (the input of every later stage).

Sources: a local folder (recursive; ``root/<class>/<file>`` gives labels, ``root/<split>/<class>/
<file>`` also a split), an ``s3://`` prefix laid out the same way, Parquet files with an image
column (a Hugging Face ``datasets`` Parquet export with its Image column and ClassLabel names, or a
committed image-shard output), or the Fashion-MNIST IDX files. Every image is decoded with Pillow
in a Ray task, EXIF-oriented, converted to RGB or L, resized and centre-cropped (or padded) to
``resolution`` and stored as PNG in Parquet shards (``infra.schemas``: the Hugging Face Image and
ClassLabel features, one file per split). Inputs that cannot be used are written to ``_errors``
files with the reason; ``read == written + rejected`` is checked, and the stage fails loudly if it
does not hold.

Items are written in a fixed pseudo-random order (by a hash of their key, the path relative to the
source root), not in listing order: a class-per-folder source gives shards that mix the classes,
and ``max_images`` keeps a sample of every class rather than the first folders. The output's
identity covers the source listing (names, sizes, modification times or ETags), so files added to
a source folder are new work.

    python -m stages.ingest --config pipelines/configs/demo.yaml ingest.resolution=64
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from infra import config as config_lib
from infra import pool, previews, schemas, sources, stage, storage, tracking
from infra.config import execution_field, input_field, output_field
from infra.devices import Resources
from infra.image_shards import ImageShards
from infra.imaging import DecodeSpec, Rejected, ResizeMode, decode
from infra.stage import InputRef, ShardMarker, StageResult, StageRun

log = logging.getLogger(__name__)
STAGE = "ingest"
HEADLINE = ("written", "rejected", "images_per_s")  # the figures a pipeline's summary shows for this stage


@dataclass(frozen=True)
class IngestConfig:
    # folder, s3:// prefix, Parquet file/folder, or the Fashion-MNIST IDX folder ("" with
    # source_format fashion_mnist: the Debian package's, infra.sources.FASHION_MNIST_URI)
    source_uri: str = input_field()
    output_uri: str = output_field()  # where the image shards go ("" = derived by the pipeline)
    source_format: sources.SourceFormat = (
        "auto"  # auto: guessed from the source (folder, parquet, fashion_mnist...)
    )
    image_column: str = "image"  # Parquet sources: the column with encoded images (bytes or datasets' Image)
    label_column: str | None = "label"  # Parquet sources: an integer label column, if any
    resolution: int = 64  # side of the square images written
    channels: int = 3  # 3 -> RGB, 1 -> L (grayscale)
    resize: ResizeMode = "crop"  # crop: shorter side + centre crop; pad: fit inside, pad the rest
    pad_value: int = 0  # resize pad: the grey level of the padding
    max_pixels: int = 89_478_485  # larger inputs are rejected as decompression bombs
    min_side: int = 8  # smaller inputs are rejected
    val_fraction: float = 0.05  # for sources without a split: share of images put in "val"
    max_images: int | None = None  # keep N items, a fixed pseudo-random sample across classes; quick runs
    rows_per_shard: int = 10_000  # images per output shard (a resume redoes at most one shard)
    # execution only (not part of the identity): how the work runs, not what it produces
    batch_size: int = execution_field(64)  # images fetched together (s3fs fetches a batch concurrently)
    # workers: shard tasks in flight (null: as the CPUs allow)
    resources: Resources = execution_field(default_factory=lambda: Resources(workers=None))

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


@dataclass(frozen=True)
class IngestPlan:
    """What ingest will read and write, from the source listing alone."""

    inputs: tuple[InputRef, ...]  # the source listing, by its digest
    source_root: str
    source_format: str
    listed: int  # items the source holds
    shards: tuple[tuple[sources.Item, ...], ...]  # the items of each output shard, in write order
    dataset: ImageShards

    @property
    def items(self) -> int:
        return sum(len(s) for s in self.shards)

    def summary(self, cfg: Any = None) -> str:
        d = self.dataset
        names = f"{len(d.label_names)} classes" if d.label_names else "no class names"
        return (
            f"{self.items:,} of {self.listed:,} images from {self.source_root} ({self.source_format}) -> "
            f"{stage.counted(len(self.shards), 'shard')}, {d.size[0]}x{d.size[1]}x{d.channels}, {names}"
        )


def plan(cfg: IngestConfig) -> IngestPlan:
    """List the source and cut it into shards; every problem fails here, by name."""
    if cfg.max_images is not None and cfg.max_images < 1:
        raise config_lib.ConfigError(f"ingest.max_images must be >= 1 (or null), got {cfg.max_images}")
    listing = sources.list_items(cfg.source, cfg.source_format, cfg.label_column)
    items = sorted(listing.items, key=lambda it: _order(it.key))[: cfg.max_images]
    n = cfg.rows_per_shard
    shards = tuple(tuple(items[lo : lo + n]) for lo in range(0, len(items), n))
    dataset = ImageShards(
        channels=cfg.channels, size=(cfg.resolution, cfg.resolution), label_names=listing.label_names
    )
    if not items:
        raise stage.InputError(f"ingest: the source {listing.root} holds no images to ingest")
    ref = InputRef.source("source", listing.root, listing.digest)
    return IngestPlan((ref,), listing.root, listing.format, len(listing.items), shards, dataset)


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
    index: int, item: dict[str, Any], cfg: IngestConfig, out: stage.StageOutput, schema: pa.Schema
) -> ShardMarker:
    """One Ray task: read, decode and write one whole shard (no image bytes pass through the driver)."""
    items = [sources.Item(**it) for it in item["items"]]
    rows: dict[str, list] = {k: [] for k in (*schema.names, "ok", "reason", "num_bytes")}
    for lo in range(0, len(items), cfg.batch_size):
        chunk = items[lo : lo + cfg.batch_size]
        for it, got in zip(chunk, sources.load_bytes(chunk, cfg.image_column)):
            row = _row(cfg, it, got)
            for k in rows:
                rows[k].append(row.get(k))
    good = [i for i, ok in enumerate(rows["ok"]) if ok]
    bad = [i for i, ok in enumerate(rows["ok"]) if not ok]

    def table(keys: list[str], which: list[int], of: pa.Schema) -> pa.Table:
        return pa.table({k: pa.array([rows[k][i] for i in which], of.field(k).type) for k in keys}, schema=of)

    data = table(schema.names, good, schema)
    rejected = table(schemas.ERROR_SCHEMA.names, bad, schemas.ERROR_SCHEMA)
    return out.write_shard(index, data, {"read": len(items)}, errors=rejected)


def _row(cfg: IngestConfig, item: sources.Item, got: tuple[bytes, bytes] | Exception) -> dict[str, Any]:
    row: dict[str, Any] = {"source_uri": item.source_uri, "label": item.label}
    try:
        if isinstance(got, Exception):
            raise Rejected(f"cannot read: {type(got).__name__}: {got}")
        id_bytes, data = got
        row["num_bytes"] = len(data)
        img = decode(data, cfg.decode_spec)
        iid = image_id(item.key, id_bytes)
        row.update(
            ok=True,
            image_id=iid,
            image={"bytes": img.png, "path": None},
            source_width=img.width,
            source_height=img.height,
            split=item.split or _split_of(iid, cfg.val_fraction),
        )
    except Rejected as e:
        row.update(ok=False, reason=str(e))
    return row


def _preview(out: stage.StageOutput, markers: list[ShardMarker], n: int = 32):
    for m in markers:
        for f in m.data:
            if f.rows:
                t = storage.read_parquet(out.file_uri(f), ["image"]).slice(0, n)
                return previews.images(schemas.image_bytes(t["image"]))
    return None


def _reasons(out: stage.StageOutput, markers: list[ShardMarker]) -> dict[str, int]:
    reasons: Counter[str] = Counter()
    for m in markers:
        if m.errors is not None:
            t = storage.read_parquet(out.file_uri(m.errors), ["reason"])
            reasons.update(r.split(":")[0] for r in t["reason"].to_pylist())
    return dict(reasons)


def run(cfg: IngestConfig, experiment: str = tracking.DEFAULT_EXPERIMENT) -> StageResult:
    """Run (or resume, or reuse) the ingest stage."""
    p = plan(cfg)
    job = StageRun(STAGE, cfg, p.inputs, experiment)
    if (done := job.cached()) is not None:
        return done
    log.info("ingest: %s", p.summary())
    work = [{"items": [dataclasses.asdict(it) for it in shard]} for shard in p.shards]
    with job:
        markers, reused = pool.map_items(
            ingest_shard, (cfg, job.out, p.dataset.schema()), work, job.out, cfg.resources
        )
        counts = stage.tally(STAGE, markers, expected=p.items)
        counts.update(shards=len(markers), reused_shards=reused)
        if (grid := _preview(job.out, markers)) is not None:
            tracking.log_image(grid, "previews/ingest_samples.png")
        if counts["rejected"]:
            tracking.log_dict(_reasons(job.out, markers), "rejected_reasons.json")
        fresh = reused < len(markers)
        return job.commit(
            markers,
            counts=counts,
            figures={"images_per_s": p.items / max(job.seconds, 1e-9) if fresh else 0.0},
            dataset=p.dataset,
            extra={"source_format": p.source_format, "source_root": p.source_root},
        )


def main(argv: list[str] | None = None) -> StageResult:
    from infra.cli import stage_main

    return stage_main(STAGE, IngestConfig, __doc__, run, argv)


if __name__ == "__main__":
    main()
