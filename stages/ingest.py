"""Ingest: raw images -> validated, uniformly sized image shards (the input of every later stage).

Sources: a local folder (recursive; ``root/<class>/<file>`` gives labels, ``root/<split>/<class>/
<file>`` also a split), an ``s3://`` prefix laid out the same way, Parquet files with an image-bytes
column, or the Fashion-MNIST IDX files. Every image is decoded with Pillow in a Ray Data step,
EXIF-oriented, converted to RGB or L, resized and centre-cropped (or padded) to ``resolution`` and
stored as PNG in Parquet shards with the columns of ``infra.schemas.IMAGE_SCHEMA``. Inputs that
cannot be used are written to ``_errors`` shards with the reason; ``read == written + rejected``
is checked, and the stage fails loudly if it does not hold.

    python -m stages.ingest --config pipelines/configs/demo.yaml ingest.resolution=64
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from infra import config as config_lib
from infra import io, schemas, sources, tracking
from infra.imaging import DecodeSpec, Rejected, ResizeMode, decode, image_grid, png_to_array

log = logging.getLogger(__name__)
STAGE = "ingest"


@dataclass(frozen=True)
class IngestConfig:
    source_uri: str  # folder, s3:// prefix, Parquet file/folder, or the Fashion-MNIST IDX folder
    output_uri: str = ""  # where the image shards go ("" = derived by the pipeline from run.root_uri)
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
    max_images: int | None = None  # keep only the first N items (in stable order); for quick runs
    rows_per_shard: int = 10_000
    # execution only (not part of the config hash): how the work runs, not what it produces
    batch_size: int = 64  # images fetched together (s3fs fetches a batch concurrently)
    num_cpus: float = 1.0  # per shard task
    concurrency: int | None = None  # max shards in flight (None: as many as the CPUs allow)

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


EXECUTION_FIELDS = ("output_uri", "batch_size", "num_cpus", "concurrency")


@dataclass(frozen=True)
class IngestResult:
    output_uri: str
    read: int
    written: int
    rejected: int
    shards: int
    reused_shards: int
    label_names: list[str] | None
    manifest: io.Manifest
    cached: bool  # True when an identical run had already committed: nothing was redone


def image_id(source_uri: str, data: bytes) -> str:
    h = hashlib.sha256(source_uri.encode())
    h.update(b"\0")
    h.update(data)
    return h.hexdigest()[:32]


def _split_of(iid: str, val_fraction: float) -> str:
    return "val" if int(iid[:8], 16) / 0xFFFFFFFF < val_fraction else "train"


def ingest_shards(
    batch: dict[str, np.ndarray], cfg: IngestConfig, out: io.StageOutput, metadata: dict[str, str]
) -> dict[str, Any]:
    """Ray Data step over shard specs: read, decode and write one whole shard per row.

    Each task writes its own shard and marker, so no image bytes pass through the driver and a
    shard is either complete (marker written) or absent.
    """
    markers = []
    for shard, spec in zip(batch["shard"], batch["items"]):
        items = json.loads(spec)
        rows: dict[str, list] = {k: [] for k in (*schemas.IMAGE_SCHEMA.names, "ok", "reason", "num_bytes")}
        for lo in range(0, len(items), cfg.batch_size):
            chunk = items[lo : lo + cfg.batch_size]
            for item, got in zip(chunk, sources.load_bytes(chunk, cfg.image_column)):
                row = _row(cfg, item, got)
                for k in rows:
                    rows[k].append(row.get(k))
        tables = _shard_tables(pa.table(rows), metadata)
        markers.append(json.dumps(out.write_shard(int(shard), tables, {"read": len(items)})))
        log.info(
            "ingest: shard %d written (%d images, %d rejected)",
            shard,
            tables["data"].num_rows,
            tables["_errors"].num_rows,
        )
    return {"marker": markers}


def _row(cfg: IngestConfig, item: dict[str, Any], got: tuple[bytes, bytes] | Exception) -> dict[str, Any]:
    row: dict[str, Any] = {"source_uri": item["source_uri"], "label": item["label"]}
    try:
        if isinstance(got, Exception):
            raise Rejected(f"cannot read: {type(got).__name__}: {got}")
        id_bytes, data = got
        row["num_bytes"] = len(data)
        img = decode(data, cfg.decode_spec)
        iid = image_id(item["source_uri"], id_bytes)
        split = item["split"] or _split_of(iid, cfg.val_fraction)
        row.update(ok=True, image_id=iid, image=img.png, width=img.width, height=img.height, split=split)
    except Rejected as e:
        row.update(ok=False, reason=str(e))
    return row


def _shard_tables(rows: pa.Table, metadata: dict[str, str]) -> dict[str, pa.Table]:
    ok = rows.filter(pa.compute.equal(rows["ok"], True))
    bad = rows.filter(pa.compute.equal(rows["ok"], False))
    data = ok.select(schemas.IMAGE_SCHEMA.names).sort_by("source_uri")
    data = data.cast(schemas.with_metadata(schemas.IMAGE_SCHEMA, metadata))
    errors = bad.select(schemas.ERROR_SCHEMA.names).sort_by("source_uri").cast(schemas.ERROR_SCHEMA)
    return {"data": data, "_errors": errors}


def _preview(out: io.StageOutput, markers: list[dict[str, Any]], n: int = 32) -> np.ndarray | None:
    for m in markers:
        if m["files"]["data"]["rows"]:
            t = io.read_parquet(io.join(out.output_uri, m["files"]["data"]["path"]), ["image"]).slice(0, n)
            return image_grid([png_to_array(b) for b in t.column("image").to_pylist()])
    return None


def run(cfg: IngestConfig, experiment: str = tracking.DEFAULT_EXPERIMENT) -> IngestResult:
    """Run (or resume, or reuse) the ingest stage; returns its counts and manifest."""
    import ray

    from infra.cluster import ensure_ray

    if not cfg.output_uri:
        raise config_lib.ConfigError("ingest.output_uri is not set")
    chash = config_lib.config_hash(cfg, exclude=EXECUTION_FIELDS)
    out = io.StageOutput(cfg.output_uri, STAGE, chash)
    if (m := out.committed()) is not None:
        log.info("ingest: %s is already committed with this config; nothing to do", out.output_uri)
        return _result(m, cached=True)

    listing = sources.list_items(cfg.source_uri, cfg.source_format, cfg.label_column)
    items = sorted(listing.items, key=lambda it: it["source_uri"])[: cfg.max_images]
    n_shards = max(1, -(-len(items) // cfg.rows_per_shard))
    done = out.done_shards()
    pending = [i for i in range(n_shards) if i not in done]
    log.info(
        "ingest: %d items from %s (%s) -> %d shards, %d already done",
        len(items),
        cfg.source_uri,
        listing.format,
        n_shards,
        n_shards - len(pending),
    )
    metadata = {
        "taming.label_names": json.dumps(listing.label_names),
        "taming.channels": str(cfg.channels),
        "taming.resolution": str(cfg.resolution),
        "taming.config_hash": chash,
    }

    with tracking.stage_run(STAGE, cfg, [cfg.source_uri], out.output_uri, experiment) as run_id:
        t0 = time.perf_counter()
        if pending:
            ensure_ray()
            specs = [
                {
                    "shard": s,
                    "items": json.dumps(items[s * cfg.rows_per_shard : (s + 1) * cfg.rows_per_shard]),
                }
                for s in pending
            ]
            ds = ray.data.from_items(specs, override_num_blocks=len(specs)).map_batches(
                ingest_shards,
                fn_kwargs={"cfg": cfg, "out": out, "metadata": metadata},
                batch_size=1,
                num_cpus=cfg.num_cpus,
                compute=ray.data.TaskPoolStrategy(size=cfg.concurrency) if cfg.concurrency else None,
                batch_format="numpy",
            )
            for row in ds.iter_rows():
                marker = json.loads(row["marker"])
                done[marker["index"]] = marker
        markers = [done[s] for s in range(n_shards)]
        read = sum(m["read"] for m in markers)
        written = sum(m["files"]["data"]["rows"] for m in markers)
        rejected = sum(m["files"]["_errors"]["rows"] for m in markers)
        if read != len(items) or read != written + rejected:
            raise RuntimeError(
                f"ingest counts do not add up: listed {len(items)}, read {read}, "
                f"written {written}, rejected {rejected}"
            )
        seconds = time.perf_counter() - t0
        counts = {
            "read": read,
            "written": written,
            "rejected": rejected,
            "shards": n_shards,
            "reused_shards": n_shards - len(pending),
        }
        tracking.log_metrics(
            {
                **{f"ingest/{k}": v for k, v in counts.items()},
                "ingest/seconds": seconds,
                "ingest/images_per_s": len(items) / seconds if pending and seconds else 0.0,
            }
        )
        if (grid := _preview(out, markers)) is not None:
            tracking.log_image(grid, "previews/ingest_samples.png")
        manifest = out.commit(
            config=config_lib.to_dict(cfg),
            input_uris=[cfg.source_uri],
            markers=markers,
            counts=counts,
            mlflow_run_id=run_id,
            extra={"label_names": listing.label_names, "source_format": listing.format},
        )
        if rejected:
            tracking.log_dict(_reasons(manifest), "rejected_reasons.json")
        log.info(
            "ingest: committed %s: %d read, %d written, %d rejected in %.1f s",
            out.output_uri,
            read,
            written,
            rejected,
            seconds,
        )
    return _result(manifest, cached=False)


def _reasons(manifest: io.Manifest) -> dict[str, int]:
    counts: dict[str, int] = {}
    for uri in manifest.error_uris():
        for r in io.read_parquet(uri, ["reason"]).column(0).to_pylist():
            key = r.split(":")[0]
            counts[key] = counts.get(key, 0) + 1
    return counts


def _result(m: io.Manifest, cached: bool) -> IngestResult:
    c = m.counts
    return IngestResult(
        m.output_uri,
        c["read"],
        c["written"],
        c["rejected"],
        c["shards"],
        c["reused_shards"],
        m.extra.get("label_names"),
        m,
        cached,
    )


def main(argv: list[str] | None = None) -> IngestResult:
    from infra.cli import stage_main

    return stage_main(STAGE, IngestConfig, __doc__, run, argv)


if __name__ == "__main__":
    main()
