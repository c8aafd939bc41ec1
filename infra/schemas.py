"""The Parquet schemas of every shard kind, in one place, and how the ecosystem reads them.

Every data file carries two keys in its schema metadata (and every field is nullable, as ``datasets``
declares its features: a field that differs from the feature's, nullability included, is read as
its plain Arrow type instead):
- ``huggingface``: the Hugging Face ``datasets`` features (as ``datasets`` itself writes them), so
  ``datasets.load_dataset("parquet", ...)`` gives a PIL image in ``image`` (its ``Image`` feature,
  the Arrow type ``struct<bytes: binary, path: string>``) and a ``ClassLabel`` with the class names
  in ``label`` (Arrow ``int64``, as ``datasets`` stores it);
- ``taming.dataset``: the dataset descriptor (``infra.image_shards``, ``infra.code_shards``), the
  same one the output's manifest holds.

Image shards (ingest's output, and depth's, segmentation's and sample's, which add columns) are the
input of every later stage; error shards record what a stage rejected and why, so counts always add
up: ``read == written + rejected``. Code shards (tokenize's output) hold one row per (image,
augmentation) with the codes as raw little-endian uint16 in a fixed-size binary column (2 bytes per
code, zstd): smaller and faster than Parquet's ``list<int16>``, which stores INT32 plus list levels.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa

T = TypeVar("T")

HF_KEY = "huggingface"
DESCRIPTOR_KEY = "taming.dataset"

# The Hugging Face Image feature's storage: PNG bytes here, no path.
IMAGE_TYPE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])

IMAGE_FIELDS = [
    pa.field("image_id", pa.string()),  # stable: hash of the source key and bytes
    pa.field("image", IMAGE_TYPE),  # PNG at the dataset's size
    pa.field("label", pa.int64()),
    pa.field("split", pa.string()),  # "train" / "val" / "test"
    pa.field("source_uri", pa.string()),
    pa.field("source_width", pa.int32()),  # of the source image, after EXIF orientation
    pa.field("source_height", pa.int32()),
]
# Per-image columns the preprocessing stages add, by the column that names them.
ANNOTATION_FIELDS = {
    "depth": [
        pa.field("depth", pa.binary()),  # float16 little-endian at the image size, per image in [-1, 1]
        pa.field("depth_min", pa.float32()),  # the raw relative inverse depth range
        pa.field("depth_max", pa.float32()),
    ],
    "segmentation": [pa.field("segmentation", pa.binary())],  # uint8 label ids at the image size
    "edges": [pa.field("edges", IMAGE_TYPE)],  # PNG (L) at the image size: 255 on an edge, 0 elsewhere
    "lowres": [pa.field("lowres", IMAGE_TYPE)],  # PNG at the image size: each f x f block its mean
}
# The columns stored as the Image feature (PNG): what `datasets` shows as images.
IMAGE_COLUMNS = frozenset(
    f.name for fs in (IMAGE_FIELDS, *ANNOTATION_FIELDS.values()) for f in fs if f.type == IMAGE_TYPE
)


def generated_fields(num_tokens: int, spatial: bool) -> list[pa.Field]:
    """What a generated dataset adds to the image columns: each sample's ``codes``,
    ``sample_index`` and ``seed`` and, for spatial conditions, the ``condition_image_id``."""
    fields = [
        pa.field("codes", pa.binary(2 * num_tokens)),
        pa.field("sample_index", pa.int64()),
        pa.field("seed", pa.int64()),
    ]
    if spatial:
        fields.append(pa.field("condition_image_id", pa.string()))
    return fields


ERROR_SCHEMA = pa.schema(
    [
        pa.field("source_uri", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("num_bytes", pa.int64()),
    ]
)

CODE_DTYPE = "uint16-le"
MAX_CODEBOOK = 65536


def code_fields(num_tokens: int, cond_tokens: dict[str, int] | None = None) -> list[pa.Field]:
    """``cond_tokens``: extra code columns (``depth_codes``, ``segmentation_codes``) and their lengths."""
    fields = [
        pa.field("image_id", pa.string()),
        pa.field("aug_id", pa.int16()),  # 0 = the image as is; the descriptor names the rest
        pa.field("label", pa.int64()),
        pa.field("split", pa.string()),
        pa.field("grid_h", pa.int16()),
        pa.field("grid_w", pa.int16()),
        pa.field("codes", pa.binary(2 * num_tokens)),
    ]
    for name, n in (cond_tokens or {}).items():
        fields.append(pa.field(name, pa.binary(2 * n)))
    return fields


# --------------------------------------------------------------------------- descriptors and features


_HF_DTYPES = {"float": "float32", "double": "float64", "halffloat": "float16"}


def hf_feature(field: pa.Field, label_names: list[str] | None) -> dict[str, Any]:
    """The ``datasets`` feature (its JSON form) of one column."""
    if field.type == IMAGE_TYPE:
        return {"_type": "Image"}
    if field.name == "label" and label_names:
        return {"names": list(label_names), "_type": "ClassLabel"}
    dtype = str(field.type)
    return {"dtype": _HF_DTYPES.get(dtype, dtype), "_type": "Value"}


def with_descriptor(fields: list[pa.Field], descriptor: Any, label_names: list[str] | None) -> pa.Schema:
    """The schema of ``fields`` whose metadata holds the ``datasets`` features and ``descriptor``."""
    features = {f.name: hf_feature(f, label_names) for f in fields}
    return pa.schema(
        fields,
        metadata={
            HF_KEY: json.dumps({"info": {"features": features}}),
            DESCRIPTOR_KEY: json.dumps(descriptor_json(descriptor), sort_keys=True),
        },
    )


def descriptor_json(descriptor: Any) -> dict[str, Any]:
    """A descriptor dataclass as plain JSON data (tuples as lists)."""
    from infra.config import to_dict

    return to_dict(descriptor)


def descriptor_from_json(cls: type[T], data: dict[str, Any], where: str) -> T:
    """The descriptor ``cls`` from its JSON form, every field checked (``infra.config.from_dict``)."""
    from infra.config import ConfigError, from_dict

    try:
        return from_dict(cls, data, prefix="dataset.")
    except ConfigError as e:
        from infra.stage import InputError

        raise InputError(f"{where}: its dataset descriptor does not fit {cls.__name__}: {e}") from None


# --------------------------------------------------------------------------- column values


def image_column(pngs: list[bytes]) -> pa.Array:
    """PNG bytes as the Image column (``datasets``' storage: bytes, no path)."""
    return pa.array([{"bytes": b, "path": None} for b in pngs], IMAGE_TYPE)


def image_bytes(column: pa.Array | pa.ChunkedArray) -> list[bytes]:
    """The encoded bytes of an Image column (struct<bytes, path>), or of a plain binary column."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_struct(column.type):
        column = column.field("bytes")
    return column.to_pylist()


def encode_codes(codes) -> list[bytes]:
    """(N, T) integer codes -> N little-endian uint16 byte strings."""
    arr = np.asarray(codes)
    if arr.size and (arr.min() < 0 or arr.max() >= MAX_CODEBOOK):
        raise ValueError(f"codes must lie in [0, {MAX_CODEBOOK})")
    arr = arr.astype("<u2")
    return [row.tobytes() for row in arr]


def decode_codes(column: pa.Array | pa.ChunkedArray, num_tokens: int) -> np.ndarray:
    """A fixed-size binary code column -> int64 array (N, T)."""
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
