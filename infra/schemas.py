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
