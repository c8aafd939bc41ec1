"""Image shards: the dataset every stage that reads images reads, described once.

An image-shard output (ingest's, depth's and segmentation's, which add per-image columns, and the
sample stage's generated datasets) is described by one typed descriptor, written by the stage that
makes the output (into its manifest and every data file's footer) and read by :func:`describe`:

- :class:`ImageShards`: channels, the image size, the class names, and the per-image columns
  preprocessing added (:class:`Annotation`: depth or segmentation maps, what made them);
- :class:`GeneratedImageShards`: the same plus :class:`Generation`, what made the images (the
  generator, its tokenizer, the sampler, the conditions).

Columns: ``infra.schemas`` (``image`` is the Hugging Face Image feature, ``label`` its ClassLabel).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import pyarrow as pa

from infra import schemas, stage
from models.sampler_options import SamplerOptions


@dataclass(frozen=True, kw_only=True)
class Annotation:
    """A per-image column added by a preprocessing stage, and what made it."""

    model: str  # e.g. midas_v21_small_256, deeplabv2_cocostuff164k
    weights_sha256: str  # "" for a weight-free algorithm (edges, lowres)
    encoding: str  # how a value is stored (float16-le maps in [-1, 1], uint8 label ids)
    labels: list[str] | None = None  # label maps: the name of each id
    params: dict[str, float] | None = None  # a weight-free algorithm's parameters (thresholds, factor)


@dataclass(frozen=True, kw_only=True)
class ImageShards:
    kind: Literal["image_shards"] = "image_shards"
    channels: int  # 1 (L) or 3 (RGB)
    size: tuple[int, int]  # (height, width) of every image
    label_names: list[str] | None  # the name of each label id (None: no names recorded)
    annotations: dict[str, Annotation] = field(default_factory=dict)  # depth / segmentation columns

    @property
    def resolution(self) -> int | None:
        """The side of square images, None for other shapes."""
        return self.size[0] if self.size[0] == self.size[1] else None

    def annotated(self, column: str, annotation: Annotation) -> ImageShards:
        """This descriptor with one more per-image column."""
        return dataclasses.replace(self, annotations={**self.annotations, column: annotation})

    def fields(self) -> list[pa.Field]:
        out = list(schemas.IMAGE_FIELDS)
        for column in self.annotations:
            out += schemas.ANNOTATION_FIELDS[column]
        return out

    def schema(self) -> pa.Schema:
        """The Arrow schema of every data file (features and descriptor in its metadata)."""
        return schemas.with_descriptor(self.fields(), self, self.label_names)

    def to_json(self) -> dict:
        return schemas.descriptor_json(self)


@dataclass(frozen=True, kw_only=True)
class Generation:
    """What made a generated dataset: the generator, its tokenizer, the sampler, the conditions."""

    generator_uri: str  # as the config named it
    pinned_uri: str  # what was loaded: a registry alias resolved to its version
    generator_sha256: str
    generator_format: Literal["native", "taming"]
    registry_name: str | None  # the registered model, when loaded from the registry
    registry_version: int | None
    training_run_id: str | None  # the MLflow run that trained (or registered) it
    condition: str  # unconditional, class, spatial
    tokenizer_uri: str | None  # None: an official release bundles it
    tokenizer_sha256: str
    grid: tuple[int, int]  # codes per sample
    codebook_size: int
    sampler: SamplerOptions
    seed: int
    tile: int
    conditions_uri: str | None = None  # spatial: the code shards of the conditions
    conditions_column: str | None = None
    conditions_split: str | None = None
    samples_per_condition: int = 1
    condition_rows: int = 0
    label_counts: dict[str, int] | None = None  # class: samples per label id
    acceptance_rate: float = 1.0  # rejection sampling: each sample the best of 1 / rate candidates
    classifier_sha256: str | None = None  # the classifier that ranked them


@dataclass(frozen=True, kw_only=True)
class GeneratedImageShards(ImageShards):
    kind: Literal["generated_image_shards"] = "generated_image_shards"  # type: ignore[assignment]
    generation: Generation

    def fields(self) -> list[pa.Field]:
        g = self.generation
        return super().fields() + schemas.generated_fields(g.grid[0] * g.grid[1], g.condition == "spatial")


KINDS: dict[str, type[ImageShards]] = {
    "image_shards": ImageShards,
    "generated_image_shards": GeneratedImageShards,
}


def describe(images: str | stage.Manifest) -> ImageShards:
    """The descriptor of a committed image-shard output (its URI or its manifest);
    :class:`~infra.stage.InputError` for outputs that hold something else."""
    m = stage.read_manifest(images) if isinstance(images, str) else images
    kind = (m.dataset or {}).get("kind")
    if kind not in KINDS:
        raise stage.InputError(
            f"{m.output_uri} is a committed {m.stage} output, not image shards (run ingest, or give the "
            "output of a stage that writes images)"
        )
    return schemas.descriptor_from_json(KINDS[kind], m.dataset, m.output_uri)


def column_values(t: pa.Table, column: str) -> list[bytes]:
    """An image-shard column's values as bytes: the PNGs of ``image`` (``edges``, ``lowres``), the
    maps of the other annotations."""
    return schemas.image_bytes(t[column]) if column in schemas.IMAGE_COLUMNS else t[column].to_pylist()


def rows_by_id(uri: str, ids: Sequence[str], columns: list[str]) -> pa.Table:
    """The rows of ``ids`` (in that order, repeated as they repeat) from a committed image-shard
    output, ``columns`` of them; :class:`~infra.stage.InputError` names an id it does not hold.

    Only the ``image_id`` column of every file is read to find the rows; then only the files that
    hold them, each verified against its manifest entry (:func:`infra.stage.read_rows`)."""
    files = stage.read_manifest(uri).data_files()
    found = stage.read_committed_table(uri, ["image_id"], verify=False)["image_id"].to_pylist()
    wanted, where, k = set(ids), {}, 0
    for fi, f in enumerate(files):
        for r, v in enumerate(found[k : k + f.rows]):
            if v in wanted:
                where.setdefault(v, (fi, r))
        k += f.rows
    missing = next((v for v in ids if v not in where), None)
    if missing is not None:
        raise stage.InputError(f"{uri} holds no image {missing}")
    columns = ["image_id", *[c for c in columns if c != "image_id"]]
    return stage.read_rows(uri, files, [where[v] for v in ids], columns)
