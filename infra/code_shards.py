"""Code shards (the tokenize stage's output): what they hold, where each view was cropped, and
reading them for training, with plain pyarrow or Ray Data, filtered by split and label, as batches
with ``codes`` as (B, grid_h * grid_w) int64 (and the condition columns alike). Only files the
manifest lists are read.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from infra import schemas, stage, storage

COLUMNS = ["image_id", "aug_id", "label", "split", "grid_h", "grid_w", "codes"]
CONDITION_COLUMNS = ("depth_codes", "segmentation_codes")  # codes of a second tokenizer, same views


def info(codes: str | stage.Manifest) -> dict[str, Any]:
    """What a code-shard output holds: codebook size, grid, code dtype, the tokenizer (URI, sha256),
    label names, augmentations, and per condition column its codebook size and tokenizer sha256
    (from the files' footers); ``codes``: its URI or its manifest. Raises
    :class:`~infra.stage.InputError` for other outputs."""
    m = stage.read_manifest(codes) if isinstance(codes, str) else codes
    if "codebook_size" not in m.extra or "grid" not in m.extra:
        raise stage.InputError(
            f"{m.output_uri} is a committed {m.stage} output, not code shards (run tokenize_images)"
        )
    out = {
        k: m.extra.get(k)
        for k in ("codebook_size", "grid", "code_dtype", "tokenizer_uri", "tokenizer_sha256", "label_names")
    }
    out["augmentations"] = m.extra.get("augmentations") or ["identity"]
    out["crop_size"] = m.config.get("crop_size")
    meta = {
        k.decode(): v.decode() for k, v in (storage.parquet_schema(m.data_uris()[0]).metadata or {}).items()
    }
    out["conditions"] = {
        col: {
            "codebook_size": int(meta[f"taming.{col}.codebook_size"]),
            "tokenizer_sha256": meta.get(f"taming.{col}.tokenizer_sha256"),
        }
        for col in CONDITION_COLUMNS
        if f"taming.{col}.codebook_size" in meta
    }
    return out


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


def _filter(t: pa.Table, split: str | None, labels: Sequence[int] | None) -> pa.Table:
    if split is not None:
        t = t.filter(pc.equal(t["split"], split))
    if labels is not None:
        t = t.filter(pc.is_in(t["label"], pa.array(list(labels), pa.int32())))
    return t


def labels_of(t: pa.Table) -> np.ndarray:
    """The label column as int64, missing labels -1."""
    labels = t["label"].to_numpy(zero_copy_only=False)
    return np.nan_to_num(labels.astype(np.float64), nan=-1).astype(np.int64)


def condition_lengths(t: pa.Table | pa.Schema) -> dict[str, int]:
    """Tokens per row of each condition code column present."""
    schema = t.schema if isinstance(t, pa.Table) else t
    return {c: schema.field(c).type.byte_width // 2 for c in CONDITION_COLUMNS if c in schema.names}


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
    h, w = m.extra["grid"]
    uris = m.data_uris()
    rng = np.random.default_rng(shuffle_seed) if shuffle_seed is not None else None
    if rng is not None:
        uris = [uris[i] for i in rng.permutation(len(uris))]
    pending: pa.Table | None = None
    for u in uris:
        t = _filter(storage.read_parquet(u, COLUMNS), split, labels)
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
    h, w = m.extra["grid"]
    n = h * w
    ds = ray_train.read_parquet(m.data_uris(), [*COLUMNS, *columns], seed)

    def decode(batch: pa.Table) -> dict[str, np.ndarray]:
        batch = _filter(batch, split, labels)
        out = decode_rows(batch, n)
        if derive is not None:
            out.update(derive(batch))
        return out

    return ds.map_batches(decode, batch_format="pyarrow")
