"""Code shards (the tokenize stage's output): what they hold, described once, where each view was
cropped, and reading them for training, with plain pyarrow or Ray Data, filtered by split and label,
as batches with ``codes`` as (B, grid_h * grid_w) int64 (and the condition columns alike). Only files
the manifest lists are read, and only those of the split asked for.

The descriptor (:class:`CodeShards`) is written by the tokenize stage into the manifest and every
data file's footer and read by :func:`describe`: the codebook, the grid, the tokenizer (URI and
sha256), the class names, the augmentations (``aug_id`` i is ``augmentations[i]``), the size of
the images tokenized, and per condition column (:class:`ConditionCodes`) its tokenizer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from infra import image_shards, schemas, stage, storage

COLUMNS = ["image_id", "aug_id", "label", "split", "grid_h", "grid_w", "codes"]
# codes of a second tokenizer, the same views: column -> the image-shard column it tokenized
CONDITION_SOURCES = {
    "depth_codes": "depth",
    "segmentation_codes": "segmentation",
    "edges_codes": "edges",
    "lowres_codes": "lowres",
}


@dataclass(frozen=True, kw_only=True)
class ConditionCodes:
    """A condition code column (``<source>_codes``, :data:`CONDITION_SOURCES`) and its tokenizer."""

    codebook_size: int
    grid: tuple[int, int]
    tokenizer_uri: str
    tokenizer_sha256: str

    @property
    def length(self) -> int:
        return self.grid[0] * self.grid[1]


@dataclass(frozen=True, kw_only=True)
class CodeShards:
    kind: Literal["code_shards"] = "code_shards"
    codebook_size: int
    grid: tuple[int, int]  # (grid_h, grid_w) of every row
    code_dtype: str = schemas.CODE_DTYPE
    tokenizer_uri: str
    tokenizer_sha256: str
    label_names: list[str] | None
    augmentations: list[str]  # aug_id i is augmentations[i]: identity, hflip, crop0, crop1, ...
    crop_size: int | None  # the views' side when cropping (identity and hflip: the centre crop)
    image_size: tuple[int, int]  # (height, width) of the images tokenized
    conditions: dict[str, ConditionCodes] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def fields(self) -> list[pa.Field]:
        return schemas.code_fields(self.num_tokens, {c: v.length for c, v in self.conditions.items()})

    def schema(self) -> pa.Schema:
        """The Arrow schema of every data file (features and descriptor in its metadata)."""
        return schemas.with_descriptor(self.fields(), self, self.label_names)

    def to_json(self) -> dict:
        return schemas.descriptor_json(self)


def describe(codes: str | stage.Manifest) -> CodeShards:
    """The descriptor of committed code shards (their URI or manifest);
    :class:`~infra.stage.InputError` for outputs that are not code shards."""
    m = stage.read_manifest(codes) if isinstance(codes, str) else codes
    if (m.dataset or {}).get("kind") != "code_shards":
        raise stage.InputError(
            f"{m.output_uri} is a committed {m.stage} output, not code shards (run tokenize_images)"
        )
    return schemas.descriptor_from_json(CodeShards, m.dataset, m.output_uri)


def images_uri(codes: stage.Manifest) -> str | None:
    """The image shards a code-shard output was tokenized from (its ``images`` input)."""
    return next((i.uri for i in codes.inputs if i.name == "images"), None)


def condition_params(codes: stage.Manifest, column: str) -> dict | None:
    """The parameters of the annotation a condition code column tokenized (e.g. the ``lowres``
    factor, the ``edges`` thresholds), read from the image shards the codes came from; None when
    that output records none or is gone."""
    uri = images_uri(codes)
    try:
        annotation = image_shards.describe(uri).annotations.get(CONDITION_SOURCES[column]) if uri else None
    except (stage.InputError, FileNotFoundError):
        return None
    return dict(annotation.params) if annotation is not None and annotation.params else None


def crop_offset(image_id: str, k: int, side: int, crop: int) -> tuple[int, int]:
    """Pixel offset (row, column) of random crop ``k`` of an image: fixed by its id (tokenize's rule)."""
    h = hashlib.sha256(f"{image_id}:{k}".encode()).digest()
    span = side - crop + 1
    return int.from_bytes(h[:4], "little") % span, int.from_bytes(h[4:8], "little") % span


def view_geometry(
    image_id: str, augmentation: str, side: int, crop: int | None
) -> tuple[int, int, int, bool]:
    """Where the view ``augmentation`` of an image lies in it: (row, column, size, mirrored)."""
    if augmentation.startswith("crop"):
        return (*crop_offset(image_id, int(augmentation[4:]), side, crop), crop, False)
    size = crop or side
    o = (side - size) // 2  # identity and hflip use the centre crop when cropping
    return o, o, size, augmentation == "hflip"


def views(full: np.ndarray, image_ids: Sequence[str], augmentations: Sequence[str], crop: int | None):
    """(aug_id, array) of every augmentation of a batch (N, C, H, W) of square images, as tokenize
    writes them (:func:`view_geometry`): the same views for images and their condition maps."""
    x = full
    side = full.shape[-1]
    if crop:  # every row at the crop size: identity and hflip use the centre crop
        o = (side - crop) // 2
        x = full[..., o : o + crop, o : o + crop]
    for aug_id, aug in enumerate(augmentations):
        if aug == "identity":
            yield aug_id, x
        elif aug == "hflip":
            yield aug_id, x[..., ::-1]
        else:
            offs = [crop_offset(i, int(aug[4:]), side, crop) for i in image_ids]
            yield aug_id, np.stack([full[n, :, r : r + crop, q : q + crop] for n, (r, q) in enumerate(offs)])


def _filter(t: pa.Table, split: str | None, labels: Sequence[int] | None) -> pa.Table:
    if split is not None:
        t = t.filter(pc.equal(t["split"], split))
    if labels is not None:
        t = t.filter(pc.is_in(t["label"], pa.array(list(labels), pa.int64())))
    return t


def labels_of(t: pa.Table) -> np.ndarray:
    """The label column as int64, missing labels -1."""
    labels = t["label"].to_numpy(zero_copy_only=False)
    return np.nan_to_num(labels.astype(np.float64), nan=-1).astype(np.int64)


def condition_lengths(t: pa.Table | pa.Schema) -> dict[str, int]:
    """Tokens per row of each condition code column present."""
    schema = t.schema if isinstance(t, pa.Table) else t
    return {c: schema.field(c).type.byte_width // 2 for c in CONDITION_SOURCES if c in schema.names}


def decode_rows(t: pa.Table, num_tokens: int) -> dict[str, np.ndarray]:
    """Numpy columns of code-shard rows: codes (N, T), label (missing: -1), aug_id, and every
    condition code column present, as (N, Tc) int64."""
    out = {
        "codes": schemas.decode_codes(t["codes"], num_tokens),
        "label": labels_of(t),
        "aug_id": t["aug_id"].to_numpy().astype(np.int64),
    }
    for col, n in condition_lengths(t).items():
        out[col] = schemas.decode_codes(t[col], n)
    return out


def _to_torch(t: pa.Table, num_tokens: int) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {k: torch.from_numpy(v) for k, v in decode_rows(t, num_tokens).items()}
    out["image_id"] = t["image_id"].to_pylist()
    return out


def iter_batches(
    uri: str,
    batch_size: int,
    *,
    split: str | None = None,
    labels: Sequence[int] | None = None,
    shuffle_seed: int | None = None,
    drop_last: bool = False,
) -> Iterator[dict[str, Any]]:
    """Torch batches from the shards with pyarrow alone (single process); missing labels are -1."""
    m = stage.read_manifest(uri)
    h, w = describe(m).grid
    files = m.data_files(split)
    rng = np.random.default_rng(shuffle_seed) if shuffle_seed is not None else None
    if rng is not None:
        files = [files[i] for i in rng.permutation(len(files))]
    pending: pa.Table | None = None
    for f in files:
        t = _filter(stage.read_file(storage.join(m.output_uri, f.path), f, COLUMNS), split, labels)
        if rng is not None and t.num_rows:
            t = t.take(pa.array(rng.permutation(t.num_rows)))
        pending = t if pending is None else pa.concat_tables([pending, t])
        while pending.num_rows >= batch_size:
            yield _to_torch(pending.slice(0, batch_size), h * w)
            pending = pending.slice(batch_size)
    if pending is not None and pending.num_rows and not drop_last:
        yield _to_torch(pending, h * w)


def ray_dataset(
    uri: str,
    *,
    split: str | None = None,
    labels: Sequence[int] | None = None,
    seed: int = 0,
    columns: Sequence[str] = (),
    derive: Any = None,
):
    """A Ray Dataset over the shards (in an order permuted by ``seed``, see ``infra.ray_train``) with
    ``codes``, ``label``, ``aug_id`` and the condition code ``columns`` decoded (for
    ``get_dataset_shard(...).iter_torch_batches()``); ``derive(table) -> {name: array}`` adds
    columns computed from the rows (e.g. coordinate conditions)."""
    from infra import ray_train

    m = stage.read_manifest(uri)
    n = describe(m).num_tokens
    ds = ray_train.read_parquet(m.data_uris(split), [*COLUMNS, *columns], seed)

    def decode(batch: pa.Table) -> dict[str, np.ndarray]:
        batch = _filter(batch, split, labels)
        out = decode_rows(batch, n)
        if derive is not None:
            out.update(derive(batch))
        return out

    return ds.map_batches(decode, batch_format="pyarrow")


def coord_column(batch: pa.Table, *, codes: CodeShards, levels: int) -> dict[str, np.ndarray]:
    """taming's coordinate condition of each row: its view's code cells in the full image,
    quantised to ``levels`` (``models.net2net.coord_levels_map``), as (N, grid_h * grid_w)."""
    from models.net2net import coord_levels_map

    side = codes.image_size[0]
    rows = []
    for image_id, aug in zip(batch["image_id"].to_pylist(), batch["aug_id"].to_pylist()):
        r, q, size, flip = view_geometry(image_id, codes.augmentations[aug], side, codes.crop_size)
        rows.append(coord_levels_map(codes.grid, (side, side), (r, q), size, levels, flip).numpy())
    return {"coord": np.stack(rows) if rows else np.zeros((0, codes.num_tokens), np.int64)}


def unaugmented_rows(uri: str, files: Sequence[stage.FileEntry]) -> list[tuple[int, int]]:
    """(file, row) of every row of the committed ``files`` of ``uri`` that holds an image as it is
    (``aug_id`` 0)."""
    rows: list[tuple[int, int]] = []
    for fi, f in enumerate(files):
        keep = stage.read_file(storage.join(uri, f.path), f, ["aug_id"])["aug_id"].to_numpy() == 0
        rows += [(fi, int(r)) for r in np.flatnonzero(keep)]
    return rows


def read_rows(
    uri: str, files: Sequence[stage.FileEntry], rows: Sequence[tuple[int, int]], column: str, length: int
):
    """(file, row) -> (image_id, codes (length,)) of the rows asked for, one (verified) read per
    file; ``files``: the committed data files of ``uri`` the file numbers index."""
    t = stage.read_rows(uri, files, rows, ["image_id", column])
    values = schemas.decode_codes(t[column], length)
    return {(int(fi), int(r)): (iid, v) for (fi, r), iid, v in zip(rows, t["image_id"].to_pylist(), values)}
