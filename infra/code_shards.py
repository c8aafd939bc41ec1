"""Reading code shards (the tokenize stage's output) for training: plain pyarrow or Ray Data,
filtered by split and label, yielding torch batches with ``codes`` as (B, grid_h * grid_w) int64.
Only files the manifest lists are read.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from infra import schemas, stage, storage

COLUMNS = ["image_id", "aug_id", "label", "split", "grid_h", "grid_w", "codes"]


def info(uri: str) -> dict[str, Any]:
    """Codebook size, grid, code dtype, tokenizer sha256 and label names of a code-shard output."""
    m = stage.read_manifest(uri)
    return {
        k: m.extra.get(k) for k in ("codebook_size", "grid", "code_dtype", "tokenizer_sha256", "label_names")
    }


def _filter(t: pa.Table, split: str | None, labels: Sequence[int] | None) -> pa.Table:
    if split is not None:
        t = t.filter(pc.equal(t["split"], split))
    if labels is not None:
        t = t.filter(pc.is_in(t["label"], pa.array(list(labels), pa.int32())))
    return t


def _to_torch(t: pa.Table, num_tokens: int) -> dict[str, Any]:
    import torch

    labels = t["label"].to_numpy(zero_copy_only=False)
    return {
        "codes": torch.from_numpy(schemas.decode_codes(t["codes"], num_tokens)),
        "label": torch.from_numpy(np.nan_to_num(labels.astype(np.float64), nan=-1).astype(np.int64)),
        "aug_id": torch.from_numpy(t["aug_id"].to_numpy().astype(np.int64)),
        "image_id": t["image_id"].to_pylist(),
    }


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


def ray_dataset(uri: str, *, split: str | None = None, labels: Sequence[int] | None = None, seed: int = 0):
    """A Ray Dataset over the shards (in an order permuted by ``seed``, see ``infra.ray_train``) with
    ``codes`` decoded to (N, T) int64 arrays (for ``get_dataset_shard(...).iter_torch_batches()``)."""
    from infra import ray_train

    m = stage.read_manifest(uri)
    h, w = m.extra["grid"]
    n = h * w
    ds = ray_train.read_parquet(m.data_uris(), COLUMNS, seed)

    def decode(batch: pa.Table) -> dict[str, np.ndarray]:
        batch = _filter(batch, split, labels)
        return {
            "codes": schemas.decode_codes(batch["codes"], n),
            "label": np.nan_to_num(
                batch["label"].to_numpy(zero_copy_only=False).astype(np.float64), nan=-1
            ).astype(np.int64),
            "aug_id": batch["aug_id"].to_numpy().astype(np.int64),
        }

    return ds.map_batches(decode, batch_format="pyarrow")
