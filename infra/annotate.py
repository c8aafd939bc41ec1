"""The kit of the stages that add per-image columns to image shards (``depth``, ``segmentation``
with a network's weights; ``edges``, ``lowres`` with a fixed algorithm and no weights).

Each output shard is an input data file plus the new columns (depth maps, label maps), in the same
row order, written by a Ray Data actor pool that loads the model once per actor. Images the model
cannot handle go to the shard's ``_errors`` file with the reason; ``read == written + rejected`` is
checked. The output's descriptor is its input's with one more :class:`~infra.image_shards.Annotation`
(the model, the sha256 of its weights, the encoding); the weights' sha256 is part of the identity
(a weight-free stage's parameters are, through its config).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from infra import config as config_lib
from infra import image_shards, model_store, pool, schemas, stage, storage, tracking
from infra.devices import Resources
from infra.image_shards import Annotation, ImageShards
from infra.imaging import pngs_to_array
from infra.stage import FileEntry, InputRef, Manifest, ShardMarker, StageOutput, StageResult, StageRun


@dataclass(frozen=True)
class AnnotatePlan:
    """What an annotating stage will read and write, from the input's manifest and the weights file."""

    stage: str
    column: str  # the column it adds (depth, segmentation)
    inputs: tuple[InputRef, ...]  # the image shards (by identity) and the weights (by sha256), if any
    images: Manifest  # the image shards read
    files: tuple[FileEntry, ...]  # their data files: one output shard each
    rows: int
    weights_path: str | None  # None: a weight-free algorithm
    dataset: ImageShards  # the input's descriptor with the new column

    def summary(self, cfg: Any = None) -> str:
        a = self.dataset.annotations[self.column]
        by = f"{a.model} (weights sha256 {a.weights_sha256[:12]})" if a.weights_sha256 else a.model
        return (
            f"{stage.counted(self.rows, 'image')} in {stage.counted(len(self.files), 'file')} from "
            f"{self.inputs[0].uri} -> + `{self.column}` by {by}"
        )


def plan(
    name: str,
    column: str,
    images_uri: str,
    model: str,
    weights_uri: str | None,
    weights_file: str | None,
    **facts: Any,
) -> AnnotatePlan:
    """The plan of stage ``name`` adding ``column`` with ``model`` (weights from ``weights_uri`` or the
    torch hub cache's ``weights_file``; neither: a weight-free algorithm, ``model`` says which, with
    its parameters); ``facts``: the annotation's encoding and labels."""
    if not images_uri:
        raise config_lib.ConfigError(f"{name}.images_uri is not set")
    images = stage.read_manifest(images_uri)  # a clear error before anything else when it is missing
    described = image_shards.describe(images)
    if column in described.annotations:
        raise stage.InputError(f"{name}: {images_uri} already has a `{column}` column")
    inputs: tuple[InputRef, ...] = (InputRef.output("images", images),)
    sha, path = "", None
    if weights_file is not None:
        weights = model_store.resolve_weights(weights_uri, weights_file, key=f"{name}.weights_uri")
        sha, path = model_store.file_sha256(weights), str(weights)
        inputs += (InputRef.weights("weights", weights_uri or path, sha),)
    annotation = Annotation(model=model, weights_sha256=sha, **facts)
    dataset = described.annotated(column, annotation)
    images.check_sizes()
    return AnnotatePlan(name, column, inputs, images, tuple(images.files), images.rows(), path, dataset)


class AnnotateWorker(pool.Worker):
    """Subclasses load their model in ``__init__(out, cfg, plan)`` (calling ``super().__init__``) and
    implement ``annotate(x) -> {column: list}`` for a float batch (N, 3, H, W) in [-1, 1]."""

    batch_size: int = 16

    def __init__(self, out: StageOutput, p: AnnotatePlan):
        self.out, self.schema = out, p.dataset.schema()
        self.new_fields = schemas.ANNOTATION_FIELDS[p.column]

    def annotate(self, x: np.ndarray) -> dict[str, list]:
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
                for f in self.new_fields:
                    cols.setdefault(f.name, []).append(one[f.name][0] if one else None)
            return cols, errors

    def process(self, index: int, item: dict[str, Any]) -> ShardMarker:
        t = pool.read_item(item)
        pngs = schemas.image_bytes(t["image"])
        cols: dict[str, list] = {f.name: [] for f in self.new_fields}
        errors: list[str | None] = []
        for lo in range(0, t.num_rows, self.batch_size):
            got, errs = self._annotate_safely(pngs_to_array(pngs[lo : lo + self.batch_size], 3))
            for k in cols:
                cols[k].extend(got[k])
            errors.extend(errs)
        ok = pa.array([e is None for e in errors], pa.bool_())
        full = t
        for f in self.new_fields:
            full = full.append_column(f, pa.array(cols[f.name], f.type))
        data = full.filter(ok).select(self.schema.names).cast(self.schema)  # the descriptor's column order
        bad = t.filter(pa.compute.invert(ok))
        rejected = pa.table(
            {
                "source_uri": bad["source_uri"],
                "reason": [e for e in errors if e is not None],
                "num_bytes": pa.array([None] * bad.num_rows, pa.int64()),
            },
            schema=schemas.ERROR_SCHEMA,
        )
        return self.out.write_shard(index, data, {"read": t.num_rows}, errors=rejected)


def run(
    p: AnnotatePlan,
    cfg: Any,
    worker: type[AnnotateWorker],
    preview: Callable[[list[bytes]], np.ndarray],
    resources: Resources,
    experiment: str,
) -> StageResult:
    """Run (or resume, or reuse) an annotating stage: ``worker(out, cfg, p)`` on every input file;
    ``preview(values of the new column) -> uint8 image`` renders the first rows for MLflow."""
    job = StageRun(p.stage, cfg, p.inputs, experiment)
    if (done := job.cached()) is not None:
        return done
    with job:
        markers, reused = pool.map_items(
            worker, (job.out, cfg, p), pool.file_items(p.images, list(p.files)), job.out, resources
        )
        counts = stage.tally(p.stage, markers, expected=p.rows)
        counts.update(shards=len(markers), reused_shards=reused)
        first = next((f for m in markers for f in m.data if f.rows), None)
        if first is not None:
            t = storage.read_parquet(job.out.file_uri(first), [p.column])
            values = image_shards.column_values(t, p.column)
            tracking.log_image(preview(values[:16]), f"previews/{p.stage}.png")
        return job.commit(
            markers,
            counts=counts,
            figures={"images_per_s": counts["read"] / max(job.seconds, 1e-9)},
            dataset=p.dataset,
        )
