"""Storage: one small layer over fsspec so local paths and ``s3://`` behave alike.

S3 credentials and endpoint come from the standard AWS environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``) and ``AWS_ENDPOINT_URL`` for S3-compatible
stores. Always write ``s3://bucket/key``: a bare ``bucket/key`` is a local path.

Every write is atomic (readers see nothing or the whole file), and :func:`create_bytes` is a
conditional write (create if absent) on both kinds of storage: an exclusive hard link of a complete
temporary file locally, ``If-None-Match: *`` on S3. The stage contract built on these lives in
:mod:`infra.stage`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io as _io
import json
import os
import re
import uuid
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

# --------------------------------------------------------------------------- locations


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def normalize(uri: str) -> str:
    """Absolute local paths (``~`` expanded), remote URIs untouched."""
    if is_remote(uri):
        return uri.rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return str(Path(uri).expanduser().resolve())


_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@'\"]+@")


def redact(text: str) -> str:
    """``text`` with the userinfo (``user:password@``) of every URI in it replaced by ``***@``:
    what any URI we print, log or record goes through."""
    return _USERINFO.sub(r"\g<scheme>***@", text)


def join(uri: str, *parts: str) -> str:
    out = uri.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def relative(uri: str, root: str) -> str:
    """``uri`` relative to ``root`` (``uri`` itself when it is not below ``root``)."""
    root = root.rstrip("/") + "/"
    return uri[len(root) :] if uri.startswith(root) else uri


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path within it. S3 listings are never cached:
    other processes (actors, training workers, other runs) write and remove files under the same
    prefixes, and s3fs answers ``info``/``exists`` from a cached listing of the parent folder."""
    opts = {"use_listings_cache": False} if fsspec.utils.get_protocol(uri) in ("s3", "s3a") else {}
    fs, path = fsspec.core.url_to_fs(uri, **opts)
    return fs, path


def _with_protocol(fs: fsspec.AbstractFileSystem, path: str) -> str:
    protocol = fs.protocol[0] if isinstance(fs.protocol, tuple | list) else fs.protocol
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


# --------------------------------------------------------------------------- bytes


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def _local_tmp(path: str, data: bytes) -> str:
    """``data`` in a complete, synced temporary file beside ``path``."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` so that readers see either nothing or the whole file.

    Locally: a temporary file in the same folder, then an atomic rename. On S3 a single PUT is
    atomic (objects appear whole or not at all).
    """
    fs, path = filesystem(uri)
    if is_remote(uri):
        fs.pipe_file(path, data)
        return
    os.replace(_local_tmp(path, data), path)


def create_bytes(uri: str, data: bytes) -> bool:
    """Write ``data`` only if nothing exists at ``uri`` (atomically); False when something does.

    Two writers racing for one location: exactly one succeeds. Locally the complete temporary file
    is hard-linked to the target (``link`` fails when the target exists); on S3 the PUT carries
    ``If-None-Match: *`` (S3 answers 412 when the key exists).
    """
    fs, path = filesystem(uri)
    if is_remote(uri):
        try:
            fs.pipe_file(path, data, mode="create")
        except FileExistsError:  # s3fs's translation of 412 PreconditionFailed
            return False
        return True
    tmp = _local_tmp(path, data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    return True


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def to_json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True).encode()


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, to_json_bytes(obj))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- listings


@dataclasses.dataclass(frozen=True)
class Entry:
    """A file in a listing: its URI, size and version (local: mtime in ns; S3: the ETag)."""

    uri: str
    size: int
    version: str


def _version(info: dict[str, Any]) -> str:
    for key in ("ETag", "etag"):
        if info.get(key):
            return str(info[key]).strip('"')
    mtime = info.get("mtime", info.get("LastModified", info.get("created", "")))
    if isinstance(mtime, float | int):
        return str(int(mtime * 1e9))
    return str(mtime)


def list_entries(uri: str) -> list[Entry]:
    """Every file below ``uri`` (recursive, sorted) with its size and version."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return []
    if fs.isfile(path):
        info = fs.info(path)
        return [Entry(_with_protocol(fs, path), int(info.get("size") or 0), _version(info))]
    found = fs.find(path, detail=True)
    return sorted(
        (
            Entry(_with_protocol(fs, p), int(i.get("size") or 0), _version(i))
            for p, i in found.items()
            if i.get("type") != "directory" and not p.endswith("/")  # S3 folder markers are no files
        ),
        key=lambda e: e.uri,
    )


def list_files(uri: str) -> list[str]:
    """Every file below ``uri`` (recursive, sorted), as full URIs."""
    return [e.uri for e in list_entries(uri)]


def list_dirs(uri: str) -> list[str]:
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return []
    return sorted(_with_protocol(fs, p["name"]) for p in fs.ls(path, detail=True) if p["type"] == "directory")


def remove(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def move(src: str, dst: str) -> None:
    """Move one file (locally an atomic rename; on S3 a server-side copy, then the delete)."""
    fs, src_path = filesystem(src)
    _, dst_path = filesystem(dst)
    if is_remote(src):
        fs.mv(src_path, dst_path)
        return
    Path(dst_path).parent.mkdir(parents=True, exist_ok=True)
    os.replace(src_path, dst_path)


def size(uri: str) -> int | None:
    """The size of the file at ``uri`` in bytes, None when there is none."""
    fs, path = filesystem(uri)
    try:
        return int(fs.info(path).get("size") or 0)
    except FileNotFoundError:
        return None


# --------------------------------------------------------------------------- Parquet


@dataclasses.dataclass(frozen=True)
class FileEntry:
    """A file of a stage output: its path relative to the output_uri, rows, bytes, sha256 and, for
    data files of image and code shards, the split its rows belong to."""

    path: str
    rows: int
    bytes: int
    sha256: str
    split: str | None = None


def write_file(uri: str, data: bytes, rel_to: str, rows: int = 1, split: str | None = None) -> FileEntry:
    """Write ``data`` atomically; return its entry (path relative to ``rel_to``)."""
    write_bytes(uri, data)
    return FileEntry(relative(uri, rel_to), rows, len(data), sha256(data), split)


def write_parquet(
    uri: str,
    table: pa.Table,
    rel_to: str,
    compression: str = "zstd",
    split: str | None = None,
    **options: Any,
) -> FileEntry:
    """Write ``table`` atomically; return its entry (path relative to ``rel_to``).

    ``options`` go to ``pyarrow.parquet.write_table`` (e.g. ``use_dictionary``, ``write_statistics``).
    """
    buf = _io.BytesIO()
    pq.write_table(table, buf, compression=compression, **options)
    return write_file(uri, buf.getvalue(), rel_to, rows=table.num_rows, split=split)


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = filesystem(uri)
    return pq.read_table(path, filesystem=fs, columns=columns)


def parquet_schema(uri: str) -> pa.Schema:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).schema_arrow
