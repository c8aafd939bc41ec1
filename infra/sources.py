"""Where raw images come from: a folder (local or an ``s3://`` prefix), Parquet files with an
image-bytes column, or the Fashion-MNIST IDX files.

``list_items`` runs on the driver and returns small records (no image bytes), sorted by a stable
key so that shard assignment is deterministic. ``load_bytes`` runs in the workers and fetches the
bytes of a batch of items.
"""

from __future__ import annotations

import functools
import gzip
import io as _io
import struct
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from infra import io

SourceFormat = Literal["auto", "folder", "parquet", "fashion_mnist"]
SPLITS = ("train", "val", "test")

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


@dataclass(frozen=True)
class Listing:
    items: list[dict[str, Any]]  # source_uri, label, split, kind, path, index
    label_names: list[str] | None
    format: str


def detect_format(uri: str) -> str:
    files = io.list_files(uri)
    names = {f.rsplit("/", 1)[-1] for f in files}
    if {n for pair in _IDX_FILES.values() for n in pair} <= names:
        return "fashion_mnist"
    if io.MANIFEST_NAME in names or (files and all(f.endswith(".parquet") for f in files)):
        return "parquet"
    return "folder"


def list_items(uri: str, fmt: SourceFormat = "auto", label_column: str | None = "label") -> Listing:
    uri = io.normalize(uri)
    if not io.exists(uri):
        raise FileNotFoundError(f"source {uri} does not exist")
    fmt = detect_format(uri) if fmt == "auto" else fmt
    if fmt == "fashion_mnist":
        return _list_fashion_mnist(uri)
    if fmt == "parquet":
        return _list_parquet(uri, label_column)
    return _list_folder(uri)


def _list_folder(root: str) -> Listing:
    rows = []
    for f in io.list_files(root):
        parts = f[len(root) + 1 :].split("/")
        split = None
        if len(parts) >= 2 and parts[0] in SPLITS:
            split, parts = parts[0], parts[1:]
        rows.append((f, split, parts[0] if len(parts) >= 2 else None))
    names = sorted({name for _, _, name in rows if name is not None})
    ids = {n: i for i, n in enumerate(names)}
    items = [
        {
            "source_uri": f,
            "label": ids.get(name) if name else None,
            "split": split,
            "kind": "file",
            "path": f,
            "index": -1,
        }
        for f, split, name in rows
    ]
    return Listing(items, names or None, "folder")


def _list_parquet(uri: str, label_column: str | None) -> Listing:
    try:  # a committed stage output: read exactly the files its manifest lists
        files = io.read_manifest(uri).data_uris()
    except io.NotCommittedError:
        if io.exists(io.join(uri, io.ATTEMPTS_DIR)):
            raise  # a stage output that was never committed: its files are not to be trusted
        files = [f for f in io.list_files(uri) if f.endswith(".parquet") and "/_" not in f[len(uri) :]]
    if not files:
        raise FileNotFoundError(f"no Parquet files under {uri}")
    items = []
    for f in files:
        fs, path = io.filesystem(f)
        with fs.open(path, "rb") as fh:
            meta = pq.ParquetFile(fh)
            n = meta.metadata.num_rows
            names = set(meta.schema_arrow.names)
            labels = splits = None
            if label_column and label_column in names:
                labels = meta.read(columns=[label_column]).column(0).to_pylist()
            if "split" in names:
                splits = meta.read(columns=["split"]).column(0).to_pylist()
        for i in range(n):
            label = labels[i] if labels is not None else None
            split = splits[i] if splits is not None and splits[i] in SPLITS else None
            items.append(
                {
                    "source_uri": f"{f}#row={i}",
                    "label": None if label is None else int(label),
                    "split": split,
                    "kind": "parquet",
                    "path": f,
                    "index": i,
                }
            )
    return Listing(items, None, "parquet")


def read_idx(uri: str) -> np.ndarray:
    """An unsigned-byte IDX array (MNIST / Fashion-MNIST format, optionally gzipped)."""
    raw = gzip.decompress(io.read_bytes(uri)) if uri.endswith(".gz") else io.read_bytes(uri)
    _, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if dtype_code != 0x08:
        raise ValueError(f"{uri}: only unsigned-byte IDX files are supported")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


@functools.lru_cache(maxsize=4)
def _idx_images(uri: str) -> np.ndarray:
    return read_idx(uri)


def _list_fashion_mnist(root: str) -> Listing:
    items = []
    for split, (images, labels) in _IDX_FILES.items():
        image_uri, label_uri = io.join(root, images), io.join(root, labels)
        ys = read_idx(label_uri)
        items.extend(
            {
                "source_uri": f"{image_uri}#{i}",
                "label": int(y),
                "split": split,
                "kind": "idx",
                "path": image_uri,
                "index": i,
            }
            for i, y in enumerate(ys)
        )
    return Listing(items, list(FASHION_MNIST_CLASSES), "fashion_mnist")


def load_bytes(
    items: list[dict[str, Any]], image_column: str = "image"
) -> list[tuple[bytes, bytes] | Exception]:
    """For each item: ``(id_bytes, image_bytes)`` or the exception that stopped reading it.

    ``id_bytes`` are the bytes the stable ``image_id`` hashes: the file itself, or the raw pixels
    of an IDX record. Files are fetched concurrently (``fs.cat`` on a list; s3fs runs it async).
    """
    out: list[tuple[bytes, bytes] | Exception | None] = [None] * len(items)
    files = [(i, it) for i, it in enumerate(items) if it["kind"] == "file"]
    if files:
        fs, _ = io.filesystem(files[0][1]["path"])
        paths = [io.filesystem(it["path"])[1] for _, it in files]
        got = fs.cat(paths, on_error="return")
        for (i, _), p in zip(files, paths):
            data = got.get(p, FileNotFoundError(p))
            out[i] = data if isinstance(data, Exception) else (data, data)
    by_file: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        if it["kind"] in ("parquet", "idx"):
            by_file.setdefault(it["path"], []).append(i)
    for path, idxs in by_file.items():
        try:
            if items[idxs[0]]["kind"] == "idx":
                arr = _idx_images(path)
                for i in idxs:
                    pixels = arr[items[i]["index"]]
                    buf = _io.BytesIO()
                    Image.fromarray(pixels, "L").save(buf, format="PNG", compress_level=0)
                    out[i] = (pixels.tobytes(), buf.getvalue())
            else:
                col = io.read_parquet(path, [image_column]).column(0)
                for i in idxs:
                    data = col[items[i]["index"]].as_py() or b""
                    out[i] = (data, data)
        except Exception as e:  # noqa: BLE001 - recorded per item
            for i in idxs:
                out[i] = e
    return out  # type: ignore[return-value]
