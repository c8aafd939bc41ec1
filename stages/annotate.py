"""The body shared by the image-annotating stages (``depth``, ``segmentation``); not a stage itself.

Each output shard is its input image shard plus per-image columns (depth maps, label maps), in the
same row order, written by a Ray Data actor pool that loads the model once per actor. Images the
model cannot handle go to the shard's ``_errors`` table with the reason; ``read == written +
rejected`` is checked per stage. The weights' sha256 is part of the output's identity.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa

from infra import config as config_lib
from infra import model_store, pool, schemas, stage, storage, tracking
from infra.imaging import pngs_to_array
from infra.stage import InputRef, ShardMarker, StageOutput, StageResult, StageRun


class AnnotateWorker(pool.Worker):
    """Subclasses set ``self.out``, ``self.metadata`` and ``self.batch_size`` and implement
    ``annotate(x) -> {column: list}`` for a float batch (N, 3, H, W) in [-1, 1], and ``fields()``
    (the ``pa.field``s of what they add)."""

    batch_size: int = 16
    out: StageOutput
    metadata: dict[str, str]

    def annotate(self, x: np.ndarray) -> dict[str, list]:
        raise NotImplementedError

    def fields(self) -> list[pa.Field]:
        raise NotImplementedError

    def _annotate_safely(self, x: np.ndarray) -> tuple[dict[str, list], list[str | None]]:
        """The batch at once; if it fails, image by image, so one bad image costs only itself."""
        try:
            return self.annotate(x), [None] * len(x)
        except Exception:  # noqa: BLE001 - narrowed below, per image
            cols: dict[str, list] = {}
            errors: list[str | None] = []
            for i in range(len(x)):
                try:
                    one = self.annotate(x[i : i + 1])
                    errors.append(None)
                except Exception as e:  # noqa: BLE001 - recorded with its reason
                    one = None
                    errors.append(f"{type(e).__name__}: {e}")
                for f in self.fields():
                    cols.setdefault(f.name, []).append(one[f.name][0] if one else None)
            return cols, errors

    def process(self, index: int, item: dict[str, Any]) -> ShardMarker:
        t = storage.read_parquet(item["uri"])
        cols: dict[str, list] = {f.name: [] for f in self.fields()}
        errors: list[str | None] = []
        for lo in range(0, t.num_rows, self.batch_size):
            x = pngs_to_array(t["image"].slice(lo, self.batch_size).to_pylist(), 3)
            got, errs = self._annotate_safely(x)
            for k in cols:
                cols[k].extend(got[k])
            errors.extend(errs)
        ok = pa.array([e is None for e in errors], pa.bool_())
        full = t
        for f in self.fields():
            full = full.append_column(f, pa.array(cols[f.name], f.type))
        data = full.filter(ok)
        data = data.cast(schemas.with_metadata(data.schema, self.metadata))
        bad = t.filter(pa.compute.invert(ok))
        rejected = pa.table(
            {
                "source_uri": bad["source_uri"],
                "reason": [e for e in errors if e is not None],
                "num_bytes": pa.array([None] * bad.num_rows, pa.int64()),
            },
            schema=schemas.ERROR_SCHEMA,
        )
        return self.out.write_shard(index, {"data": data, "_errors": rejected}, {"read": t.num_rows})


def run_annotate(
    name: str,
    cfg: Any,
    worker: type[AnnotateWorker],
    weights_file: str,
    *,
    info: dict[str, Any],
    preview: Any,
    experiment: str,
) -> StageResult:
    """Run (or resume, or reuse) an annotating stage.

    ``cfg`` has ``images_uri``, ``output_uri``, ``model``, ``weights_uri``, ``concurrency``,
    ``num_cpus``, ``num_gpus``. ``info`` (e.g. label names) goes into the manifest as
    ``<stage>_<key>`` and into the file metadata as ``taming.<stage>_<key>``; the worker is built as
    ``worker(out, cfg, weights_path, metadata)``; ``preview(table) -> uint8 image`` renders the
    first rows for MLflow.
    """
    if not cfg.images_uri:
        raise config_lib.ConfigError(f"{name}.images_uri is not set")
    images = stage.read_manifest(cfg.images_uri)  # a clear error before anything else when it is missing
    weights = model_store.resolve_weights(cfg.weights_uri, weights_file)
    sha = model_store.file_sha256(weights)
    job = StageRun(
        name,
        cfg,
        cfg.output_uri,
        [
            InputRef.output("images", images),
            InputRef.weights("weights", cfg.weights_uri or str(weights), sha),
        ],
        experiment,
    )
    if (done := job.cached()) is not None:
        return done
    facts = {"model": cfg.model, "weights_sha256": sha, **info}
    metadata = {f"taming.{name}_{k}": v if isinstance(v, str) else json.dumps(v) for k, v in facts.items()}
    with job:
        markers, reused = pool.map_items(
            worker,
            (job.out, cfg, str(weights), metadata),
            pool.shard_items(images.data_uris()),
            job.out,
            concurrency=cfg.concurrency,
            num_cpus=cfg.num_cpus,
            num_gpus=cfg.num_gpus,
        )
        counts = stage.tally(name, markers, expected=sum(f.rows for f in images.files))
        counts.update(shards=len(markers), reused_shards=reused)
        for m in markers:
            if m.rows():
                table = storage.read_parquet(job.out.file_uri(m))
                tracking.log_image(preview(table.slice(0, 16)), f"previews/{name}.png")
                break
        return job.commit(
            markers,
            counts=counts,
            figures={"images_per_s": counts["read"] / max(job.seconds, 1e-9)},
            extra={**images.extra, **{f"{name}_{k}": v for k, v in facts.items()}},
        )
