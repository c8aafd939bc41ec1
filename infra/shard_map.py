"""Shard-to-shard stages on a Ray Data actor pool: the model is loaded once per actor, each actor
takes one whole input shard at a time and writes the matching output shard and its marker (see
``infra.io.StageOutput``). The assignment is deterministic (output shard i <- input shard i), so a
rerun after a crash writes only the shards whose markers are missing, and gives the same bytes.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from infra import io


class ShardWorker:
    """Subclass with ``__init__(self, *args)`` (load the model) and ``process(index, uri) -> marker``."""

    def process(self, index: int, uri: str) -> dict[str, Any]:
        raise NotImplementedError

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        return {
            "marker": [json.dumps(self.process(int(i), str(u))) for i, u in zip(batch["shard"], batch["uri"])]
        }


def map_shards(
    worker: type[ShardWorker],
    args: tuple,
    input_uris: list[str],
    out: io.StageOutput,
    *,
    concurrency: int = 1,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
) -> list[dict[str, Any]]:
    """Run ``worker`` over the input shards whose output is not done yet; returns every shard's marker."""
    import ray

    from infra.cluster import ensure_ray

    done = out.done_shards()
    pending = [i for i in range(len(input_uris)) if i not in done]
    if pending:
        ensure_ray()
        items = [{"shard": i, "uri": input_uris[i]} for i in pending]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            worker,
            fn_constructor_args=args,
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=concurrency, max_tasks_in_flight_per_actor=1),
            num_cpus=num_cpus,
            num_gpus=num_gpus,
        )
        for row in ds.iter_rows():
            marker = json.loads(row["marker"])
            done[marker["index"]] = marker
    return [done[i] for i in range(len(input_uris))]


class AnnotateWorker(ShardWorker):
    """Adds per-image columns to image shards (depth maps, label maps): the output shard is the input
    shard plus the new columns, in the same row order. Images the model cannot handle go to the
    shard's ``_errors`` table with the reason; ``read == written + rejected`` per shard.

    Subclasses set ``self.out`` and implement ``annotate(x) -> {column: list}`` for a float batch
    (N, 3, H, W) in [-1, 1], and ``columns() -> pa.schema fields`` of what they add.
    """

    batch_size: int = 16
    out: io.StageOutput
    metadata: dict[str, str]

    def annotate(self, x: np.ndarray) -> dict[str, list]:
        raise NotImplementedError

    def fields(self) -> list:
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

    def process(self, index: int, uri: str) -> dict[str, Any]:
        import pyarrow as pa

        from infra import schemas
        from infra.imaging import pngs_to_array

        t = io.read_parquet(uri)
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
        data = data.cast(
            data.schema.with_metadata(
                {**(t.schema.metadata or {}), **{k.encode(): v.encode() for k, v in self.metadata.items()}}
            )
        )
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


def run_annotate_stage(
    stage: str,
    cfg: Any,
    worker: type[AnnotateWorker],
    weights_file: str,
    *,
    exclude: tuple[str, ...],
    info: dict[str, Any],
    preview: Any,
    experiment: str,
) -> tuple[io.Manifest, bool]:
    """The common body of image-annotating stages (depth, segmentation).

    ``cfg`` has ``images_uri``, ``output_uri``, ``model``, ``weights_uri`` and the execution fields
    ``concurrency``, ``num_cpus``, ``num_gpus``; ``exclude`` names the fields outside the config hash.
    The weights' sha256 is part of the output's identity. ``info`` (e.g. label names) goes into the
    manifest as ``<stage>_<key>`` and into the file metadata as ``taming.<stage>_<key>``; the worker
    is built as ``worker(out, cfg, weights_path, metadata)``; ``preview(table) -> uint8 image``
    renders the first output shard for MLflow. Returns the manifest and whether it was already
    committed (nothing redone).
    """
    import json
    import time

    from infra import config as config_lib
    from infra import model_store, tracking

    if not cfg.images_uri or not cfg.output_uri:
        raise config_lib.ConfigError(f"{stage}.images_uri and {stage}.output_uri must be set")
    images = io.read_manifest(cfg.images_uri)  # a clear error before anything else when it is missing
    weights = model_store.resolve_weights(cfg.weights_uri, weights_file)
    sha = model_store.file_sha256(weights)
    chash = io.sha256(f"{config_lib.config_hash(cfg, exclude=exclude)}:{sha}".encode())[:16]
    out = io.StageOutput(cfg.output_uri, stage, chash)
    if (m := out.committed()) is not None:
        return m, True
    facts = {"model": cfg.model, "weights_sha256": sha, **info}
    metadata = {f"taming.{stage}_{k}": v if isinstance(v, str) else json.dumps(v) for k, v in facts.items()}
    extra = {f"{stage}_{k}": v for k, v in facts.items()}
    inputs = images.data_uris()
    with tracking.stage_run(stage, cfg, [cfg.images_uri], out.output_uri, experiment) as run_id:
        t0 = time.perf_counter()
        reused = len(out.done_shards())
        markers = map_shards(
            worker,
            (out, cfg, str(weights), metadata),
            inputs,
            out,
            concurrency=cfg.concurrency,
            num_cpus=cfg.num_cpus,
            num_gpus=cfg.num_gpus,
        )
        read = sum(m["read"] for m in markers)
        written = sum(m["files"]["data"]["rows"] for m in markers)
        rejected = sum(m["files"]["_errors"]["rows"] for m in markers)
        expected = sum(f.rows for f in images.files)
        if read != expected or read != written + rejected:
            raise RuntimeError(
                f"{stage} counts do not add up: {expected} images, read {read}, "
                f"written {written}, rejected {rejected}"
            )
        seconds = time.perf_counter() - t0
        counts = {
            "read": read,
            "written": written,
            "rejected": rejected,
            "shards": len(inputs),
            "reused_shards": reused,
        }
        tracking.log_metrics(
            {
                **{f"{stage}/{k}": v for k, v in counts.items()},
                f"{stage}/seconds": seconds,
                f"{stage}/images_per_s": read / seconds if seconds else 0.0,
            }
        )
        for mk in markers:
            if mk["files"]["data"]["rows"]:
                table = io.read_parquet(io.join(out.output_uri, mk["files"]["data"]["path"])).slice(0, 16)
                tracking.log_image(preview(table), f"previews/{stage}.png")
                break
        manifest = out.commit(
            config=config_lib.to_dict(cfg),
            input_uris=[cfg.images_uri],
            markers=markers,
            counts=counts,
            mlflow_run_id=run_id,
            extra={**images.extra, **extra},
        )
    return manifest, False
