"""The Parquet schemas of every shard kind, in one place.

Image shards (ingest output) are the input of every later stage; error shards record what a
stage rejected and why, so counts always add up: ``read == written + rejected``.
"""

from __future__ import annotations

import pyarrow as pa

IMAGE_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),  # stable: hash of source URI and bytes
        pa.field("image", pa.binary(), nullable=False),  # PNG bytes at the configured resolution
        pa.field("label", pa.int32(), nullable=True),
        pa.field("split", pa.string(), nullable=False),  # "train" / "val" / "test"
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),  # of the source image, after EXIF orientation
        pa.field("height", pa.int32(), nullable=False),
    ]
)


def generated_schema(num_tokens: int, spatial: bool) -> pa.Schema:
    """A generated dataset (the sample stage's output): the image-shard columns, so every stage that
    reads images reads it as it is, plus each sample's ``codes``, ``sample_index`` and ``seed``
    and, for spatial conditions, the ``condition_image_id`` it was generated from."""
    fields = list(IMAGE_SCHEMA) + [
        pa.field("codes", pa.binary(2 * num_tokens), nullable=False),
        pa.field("sample_index", pa.int64(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
    ]
    if spatial:
        fields.append(pa.field("condition_image_id", pa.string(), nullable=False))
    return pa.schema(fields)


ERROR_SCHEMA = pa.schema(
    [
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("num_bytes", pa.int64(), nullable=True),
    ]
)


def with_metadata(schema: pa.Schema, metadata: dict[str, str]) -> pa.Schema:
    """``schema`` with string key/value metadata merged in (stored in every file's footer)."""
    merged = dict(schema.metadata or {})
    merged.update({k.encode(): v.encode() for k, v in metadata.items()})
    return schema.with_metadata(merged)


# Code shards (tokenize_images output): one row per (image, augmentation). Codes are raw
# little-endian uint16 in a fixed-size binary column (2 bytes per code, zstd): smaller and faster
# than Parquet's list<int16>, which stores INT32 plus list levels.
CODE_DTYPE = "uint16-le"
MAX_CODEBOOK = 65536


def code_schema(num_tokens: int, cond_tokens: dict[str, int] | None = None) -> pa.Schema:
    """``cond_tokens``: extra code columns (``depth_codes``, ``segmentation_codes``) and their lengths."""
    fields = [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("aug_id", pa.int16(), nullable=False),  # 0 = the image as is; see the manifest for the rest
        pa.field("label", pa.int32(), nullable=True),
        pa.field("split", pa.string(), nullable=False),
        pa.field("grid_h", pa.int16(), nullable=False),
        pa.field("grid_w", pa.int16(), nullable=False),
        pa.field("codes", pa.binary(2 * num_tokens), nullable=False),
    ]
    for name, n in (cond_tokens or {}).items():
        fields.append(pa.field(name, pa.binary(2 * n), nullable=False))
    return pa.schema(fields)


def encode_codes(codes) -> list[bytes]:
    """(N, T) integer codes -> N little-endian uint16 byte strings."""
    import numpy as np

    arr = np.asarray(codes)
    if arr.size and (arr.min() < 0 or arr.max() >= MAX_CODEBOOK):
        raise ValueError(f"codes must lie in [0, {MAX_CODEBOOK})")
    arr = arr.astype("<u2")
    return [row.tobytes() for row in arr]


def decode_codes(column: pa.Array | pa.ChunkedArray, num_tokens: int):
    """A fixed-size binary code column -> int64 array (N, T)."""
    import numpy as np

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    width = getattr(column.type, "byte_width", None)
    if width != 2 * num_tokens:
        raise ValueError(
            f"code column holds {width} bytes per row, not {2 * num_tokens} ({num_tokens} codes)"
        )
    buf = column.buffers()[1]
    start = column.offset * 2 * num_tokens
    arr = np.frombuffer(buf, dtype="<u2", count=len(column) * num_tokens, offset=start)
    return arr.reshape(len(column), num_tokens).astype(np.int64)
