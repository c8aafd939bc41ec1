"""Where raw images come from: a folder (local or an ``s3://`` prefix), Parquet files with an
image column, or the Fashion-MNIST IDX files.

Parquet sources include a committed image-shard output (read through its manifest and descriptor)
and a dataset written by Hugging Face ``datasets`` (``Dataset.to_parquet``, or a Hub folder of
``train-*.parquet`` files): its ``Image`` column (``struct<bytes, path>``) is read as the image,
the class names of its ``ClassLabel`` come from the features in the file metadata, and the split
from a ``split`` column or, as ``datasets`` names them, from the file names (``train-*``,
``validation-*`` / ``val-*``, ``test-*``).

``list_items`` runs on the driver and returns small records (:class:`Item`, no image bytes), each
with a ``key`` relative to the source root (so the same files under another prefix are the same
items), and the listing's digest: the names relative to the root, sizes and versions (modification
times or ETags) of the files read, so that changed or added files make a new listing.
``load_bytes`` runs in the workers and fetches the bytes of a batch of items.

    python -m infra.sources fashion-mnist   # make sure the Debian package's files are there
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io as _io
import json
import os
import re
import struct
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from infra import schemas, stage, storage

SourceFormat = Literal["auto", "folder", "parquet", "fashion_mnist"]
SPLITS = stage.SPLITS
# A file's split as Hugging Face datasets reads it from the name: a keyword between separators.
_SPLIT_WORDS = {
    "train": ("train", "training"),
    "val": ("validation", "valid", "val", "dev"),
    "test": ("test", "testing", "eval", "evaluation"),
}
# The Debian package dataset-fashion-mnist installs the IDX files here.
FASHION_MNIST_URI = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"

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
class Item:
    """One image to ingest: where it is, its key (relative to the source root), label and split."""

    key: str
    source_uri: str
    label: int | None
    split: str | None  # None: ingest assigns train/val from the image id
    kind: Literal["file", "parquet", "idx"]
    path: str  # the file it is in
    index: int = -1  # its row (parquet) or record (idx) in that file


@dataclass(frozen=True)
class Listing:
    items: tuple[Item, ...]
    label_names: list[str] | None
    format: str
    root: str  # the folder the keys are relative to
    digest: str  # of the files read: names relative to root, sizes, versions


def split_of_name(path: str) -> str | None:
    """The split a file's name (or its folder's) gives it, as ``datasets`` maps names to splits."""
    for part in reversed(path.rsplit("/", 2)[-2:]):
        for split, words in _SPLIT_WORDS.items():
            pattern = rf"(^|[-._ 0-9])({'|'.join(words)})([-._ 0-9]|$)"
            if re.search(pattern, part.lower()):
                return split
    return None


def digest(entries: Sequence[storage.Entry], root: str) -> str:
    """A listing's digest: each file's name relative to ``root``, size and version (mtime or ETag)."""
    h = hashlib.sha256()
    for e in sorted(entries, key=lambda e: e.uri):
        h.update(f"{storage.relative(e.uri, root)}\0{e.size}\0{e.version}\n".encode())
    return h.hexdigest()[:32]


def detect_format(entries: Sequence[storage.Entry]) -> str:
    """``fashion_mnist`` (its IDX files), ``parquet`` (a committed output, or Parquet files beside
    no image files: a Hub dataset's README.md is fine), else ``folder``."""
    files = [e.uri for e in entries]
    names = {f.rsplit("/", 1)[-1] for f in files}
    if {n for pair in _IDX_FILES.values() for n in pair} <= names:
        return "fashion_mnist"
    images = set(Image.registered_extensions())
    has_images = any(os.path.splitext(n)[1].lower() in images for n in names)
    if stage.MANIFEST_NAME in names or (any(n.endswith(".parquet") for n in names) and not has_images):
        return "parquet"
    return "folder"


def list_items(uri: str, fmt: SourceFormat = "auto", label_column: str | None = "label") -> Listing:
    uri = storage.normalize(uri)
    entries = storage.list_entries(uri)
    if not entries:
        raise FileNotFoundError(
            f"source {uri} does not exist or holds no files: point ingest.source_uri at a folder, an "
            "s3:// prefix, Parquet files or the Fashion-MNIST IDX folder"
        )
    root = uri if not (len(entries) == 1 and entries[0].uri == uri) else uri.rsplit("/", 1)[0]
    fmt = detect_format(entries) if fmt == "auto" else fmt
    if fmt == "fashion_mnist":
        return _list_fashion_mnist(root, entries)
    if fmt == "parquet":
        return _list_parquet(uri, root, entries, label_column)
    return _list_folder(root, entries)


def _list_folder(root: str, entries: Sequence[storage.Entry]) -> Listing:
    rows = []
    for e in entries:
        key = storage.relative(e.uri, root)
        parts = key.split("/")
        split = None
        if len(parts) >= 2 and parts[0] in SPLITS:
            split, parts = parts[0], parts[1:]
        rows.append((e.uri, key, split, parts[0] if len(parts) >= 2 else None))
    names = sorted({name for *_, name in rows if name is not None})
    ids = {n: i for i, n in enumerate(names)}
    items = tuple(
        Item(key, f, ids.get(name) if name else None, split, "file", f) for f, key, split, name in rows
    )
    return Listing(items, names or None, "folder", root, digest(entries, root))


def _class_names(schema, label_column: str | None) -> list[str] | None:
    """The ClassLabel names of ``label_column`` in the ``datasets`` features of a file's metadata."""
    raw = (schema.metadata or {}).get(schemas.HF_KEY.encode())
    if not raw or not label_column:
        return None
    try:
        feature = json.loads(raw)["info"]["features"].get(label_column) or {}
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return list(feature["names"]) if feature.get("_type") == "ClassLabel" else None


def _list_parquet(uri: str, root: str, entries: Sequence[storage.Entry], label_column: str | None) -> Listing:
    names = None
    if stage.is_committed(uri):  # a committed stage output: read exactly the files its manifest lists
        from infra import image_shards

        m = stage.read_manifest(uri)
        m.check_sizes()
        files = m.data_uris()
        names = image_shards.describe(m).label_names
        listed = hashlib.sha256(f"output:{m.identity}".encode()).hexdigest()[:32]
    else:
        if storage.list_files(storage.join(uri, stage.ATTEMPTS_DIR)):
            stage.read_manifest(uri)  # a stage output never committed: its files are not to be trusted
        parquet = [
            e for e in entries if e.uri.endswith(".parquet") and not re.search(r"/[._]", e.uri[len(root) :])
        ]
        files, listed = [e.uri for e in parquet], digest(parquet, root)
    if not files:
        raise FileNotFoundError(f"no Parquet files under {uri}")
    items = []
    for f in files:
        fs, path = storage.filesystem(f)
        try:
            with fs.open(path, "rb") as fh:
                meta = pq.ParquetFile(fh)
                n = meta.metadata.num_rows
                columns = set(meta.schema_arrow.names)
                names = names or _class_names(meta.schema_arrow, label_column)
                labels = splits = None
                if label_column and label_column in columns:
                    labels = meta.read(columns=[label_column]).column(0).to_pylist()
                if "split" in columns:
                    splits = meta.read(columns=["split"]).column(0).to_pylist()
        except (pa.ArrowInvalid, OSError) as e:
            raise stage.InputError(f"{f} is not a readable Parquet file ({e})") from None
        named = split_of_name(storage.relative(f, root))
        for i in range(n):
            label = labels[i] if labels is not None else None
            split = splits[i] if splits is not None and splits[i] in SPLITS else named
            rel = f"{storage.relative(f, root)}#row={i}"
            items.append(
                Item(rel, f"{f}#row={i}", None if label is None else int(label), split, "parquet", f, i)
            )
    return Listing(tuple(items), names, "parquet", root, listed)


def read_idx(uri: str) -> np.ndarray:
    """An unsigned-byte IDX array (MNIST / Fashion-MNIST format, optionally gzipped)."""
    raw = gzip.decompress(storage.read_bytes(uri)) if uri.endswith(".gz") else storage.read_bytes(uri)
    _, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if dtype_code != 0x08:
        raise ValueError(f"{uri}: only unsigned-byte IDX files are supported")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


@functools.lru_cache(maxsize=4)
def _idx_images(uri: str) -> np.ndarray:
    return read_idx(uri)


def _list_fashion_mnist(root: str, entries: Sequence[storage.Entry]) -> Listing:
    items = []
    names = {n for pair in _IDX_FILES.values() for n in pair}
    used = [e for e in entries if e.uri.rsplit("/", 1)[-1] in names]
    for split, (images, labels) in _IDX_FILES.items():
        image_uri, label_uri = storage.join(root, images), storage.join(root, labels)
        ys = read_idx(label_uri)
        items.extend(
            Item(f"{images}#{i}", f"{image_uri}#{i}", int(y), split, "idx", image_uri, i)
            for i, y in enumerate(ys)
        )
    return Listing(tuple(items), list(FASHION_MNIST_CLASSES), "fashion_mnist", root, digest(used, root))


def load_bytes(items: Sequence[Item], image_column: str = "image") -> list[tuple[bytes, bytes] | Exception]:
    """For each item: ``(id_bytes, image_bytes)`` or the exception that stopped reading it.

    ``id_bytes`` are the bytes the stable ``image_id`` hashes: the file itself, or the raw pixels
    of an IDX record. Files are fetched concurrently (``fs.cat`` on a list; s3fs runs it async).
    A Parquet image column holds bytes, or the ``datasets`` Image struct (its bytes; an image that
    has only a ``path`` is read from there).
    """
    out: list[tuple[bytes, bytes] | Exception | None] = [None] * len(items)
    files = [(i, it) for i, it in enumerate(items) if it.kind == "file"]
    if files:
        fs, _ = storage.filesystem(files[0][1].path)
        paths = [storage.filesystem(it.path)[1] for _, it in files]
        got = fs.cat(paths, on_error="return")
        for (i, _), p in zip(files, paths):
            data = got.get(p, FileNotFoundError(p))
            out[i] = data if isinstance(data, Exception) else (data, data)
    by_file: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        if it.kind in ("parquet", "idx"):
            by_file.setdefault(it.path, []).append(i)
    for path, idxs in by_file.items():
        try:
            if items[idxs[0]].kind == "idx":
                arr = _idx_images(path)
                for i in idxs:
                    pixels = arr[items[i].index]
                    buf = _io.BytesIO()
                    Image.fromarray(pixels, "L").save(buf, format="PNG", compress_level=0)
                    out[i] = (pixels.tobytes(), buf.getvalue())
            else:
                col = storage.read_parquet(path, [image_column]).column(0)
                for i in idxs:
                    out[i] = _cell_bytes(col[items[i].index].as_py())
        except Exception as e:  # noqa: BLE001 - recorded per item
            for i in idxs:
                out[i] = e
    return out  # type: ignore[return-value]


def _cell_bytes(value) -> tuple[bytes, bytes] | Exception:
    """An image cell of a Parquet source: bytes, or a ``datasets`` Image struct."""
    if isinstance(value, dict):
        if value.get("bytes"):
            value = value["bytes"]
        elif value.get("path"):
            try:
                value = storage.read_bytes(value["path"])
            except OSError as e:
                return e
        else:
            value = b""
    data = value or b""
    return data, data


def ensure_fashion_mnist(root: str = FASHION_MNIST_URI) -> None:
    """Make sure the Fashion-MNIST IDX files are at ``root``: install the Debian package when they
    are missing (as root), else say how."""
    if Path(root, _IDX_FILES["train"][0]).is_file():
        return
    print(f"Fashion-MNIST not found in {root}: installing the Debian package {FASHION_MNIST_PACKAGE}")
    if os.geteuid() != 0:
        sys.exit(f"error: not root; run: sudo apt-get install {FASHION_MNIST_PACKAGE}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", FASHION_MNIST_PACKAGE]):
        if subprocess.run(cmd, env=env).returncode != 0:
            sys.exit(f"error: could not install {FASHION_MNIST_PACKAGE}; install it and rerun")


if __name__ == "__main__":
    if sys.argv[1:] != ["fashion-mnist"]:
        sys.exit("usage: python -m infra.sources fashion-mnist")
    ensure_fashion_mnist()
