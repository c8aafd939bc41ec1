"""Storage: one small layer over fsspec so local paths and ``s3://`` behave alike, plus the
stage contract (attempt folders, shard markers and a manifest committed last).

S3 credentials and endpoint come from the standard AWS environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``) and ``AWS_ENDPOINT_URL`` for S3-compatible
stores. Always write ``s3://bucket/key``: a bare ``bucket/key`` is a local path.

The stage contract
------------------
A stage writing to ``output_uri`` puts its files in an attempt folder,
``output_uri/_attempts/<config_hash>/``, one shard at a time: each shard's Parquet files first, then
a small marker ``_shards/part-NNNNN.json`` with their row counts and sha256. When every shard is
done the stage writes ``output_uri/_SUCCESS.json`` (the manifest) in one atomic write. Readers trust
only the manifest, so a crash at any point leaves nothing that looks complete, and a rerun with the
same config reuses the finished shards of its attempt folder and writes only the missing ones.
A rerun after the commit is a no-op that returns the recorded manifest; a different config at a
committed ``output_uri`` is an :class:`OutputConflictError`, never a silent overwrite.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import hashlib
import io as _io
import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST_NAME = "_SUCCESS.json"
ATTEMPTS_DIR = "_attempts"


class NotCommittedError(FileNotFoundError):
    """The location holds no committed stage output (no manifest)."""


class OutputConflictError(RuntimeError):
    """The location holds a committed output of a different configuration."""


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


def join(uri: str, *parts: str) -> str:
    out = uri.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path within it."""
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def _with_protocol(fs: fsspec.AbstractFileSystem, path: str) -> str:
    protocol = fs.protocol[0] if isinstance(fs.protocol, tuple | list) else fs.protocol
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` so that readers see either nothing or the whole file.

    Locally: a temporary file in the same folder, then an atomic rename. On S3 a single PUT is
    atomic (objects appear whole or not at all).
    """
    fs, path = filesystem(uri)
    if is_remote(uri):
        fs.pipe_file(path, data)
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True).encode())


def list_files(uri: str) -> list[str]:
    """Every file below ``uri`` (recursive, sorted), as full URIs."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return []
    if fs.isfile(path):
        return [_with_protocol(fs, path)]
    return sorted(_with_protocol(fs, p) for p in fs.find(path))


def remove(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@functools.cache
def code_version() -> str:
    """The git commit of this checkout (``+dirty`` with local changes), else the package version."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        if sha:
            dirty = subprocess.run(
                ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
            return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"taming-pipeline=={version('taming-pipeline')}"
    except PackageNotFoundError:
        return "unknown"


# --------------------------------------------------------------------------- Parquet


@dataclasses.dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the stage's output_uri
    rows: int
    bytes: int
    sha256: str


def write_parquet(
    uri: str, table: pa.Table, rel_to: str, compression: str = "zstd", **options: Any
) -> FileEntry:
    """Write ``table`` atomically; return its manifest entry (path relative to ``rel_to``).

    ``options`` go to ``pyarrow.parquet.write_table`` (e.g. ``use_dictionary``, ``write_statistics``).
    """
    buf = _io.BytesIO()
    pq.write_table(table, buf, compression=compression, **options)
    data = buf.getvalue()
    write_bytes(uri, data)
    rel = uri[len(rel_to.rstrip("/")) + 1 :] if uri.startswith(rel_to.rstrip("/") + "/") else uri
    return FileEntry(path=rel, rows=table.num_rows, bytes=len(data), sha256=sha256(data))


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = filesystem(uri)
    return pq.read_table(path, filesystem=fs, columns=columns)


# --------------------------------------------------------------------------- the stage contract


@dataclasses.dataclass
class Manifest:
    stage: str
    config_hash: str
    config: dict[str, Any]
    input_uris: list[str]
    files: list[FileEntry]  # the output's data files
    error_files: list[FileEntry]  # rejected inputs with their reasons
    counts: dict[str, int]
    mlflow_run_id: str | None
    code_version: str
    created_at: str
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    output_uri: str = ""  # filled in on read: where this manifest was found

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("output_uri")
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], output_uri: str) -> Manifest:
        d = dict(d)
        d["files"] = [FileEntry(**f) for f in d["files"]]
        d["error_files"] = [FileEntry(**f) for f in d.get("error_files", [])]
        return cls(**d, output_uri=output_uri)

    def data_uris(self) -> list[str]:
        return [join(self.output_uri, f.path) for f in self.files]

    def error_uris(self) -> list[str]:
        return [join(self.output_uri, f.path) for f in self.error_files]


def column_names(m: Manifest) -> list[str]:
    """The columns of a committed Parquet output (from its first data file's schema; [] if empty)."""
    if not m.files:
        return []
    fs, path = filesystem(m.data_uris()[0])
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).schema_arrow.names


def read_manifest(output_uri: str) -> Manifest:
    """The committed manifest at ``output_uri``; :class:`NotCommittedError` when there is none."""
    output_uri = normalize(output_uri)
    uri = join(output_uri, MANIFEST_NAME)
    if not exists(uri):
        raise NotCommittedError(
            f"{output_uri} holds no committed stage output (no {MANIFEST_NAME}); "
            "the stage that writes it has not finished"
        )
    return Manifest.from_json(read_json(uri), output_uri)


def read_committed_table(output_uri: str, columns: list[str] | None = None, verify: bool = False) -> pa.Table:
    """All data rows of a committed output (only the files its manifest lists)."""
    m = read_manifest(output_uri)
    tables = []
    for entry, uri in zip(m.files, m.data_uris()):
        if verify:
            data = read_bytes(uri)
            if sha256(data) != entry.sha256:
                raise OSError(f"{uri}: sha256 does not match the manifest (file changed after commit)")
            tables.append(pq.read_table(_io.BytesIO(data), columns=columns))
        else:
            tables.append(read_parquet(uri, columns))
    if not tables:
        return pa.table({})
    return pa.concat_tables(tables)


class StageOutput:
    """The output location of one stage run (see the module docstring for the contract)."""

    def __init__(self, output_uri: str, stage: str, config_hash: str):
        self.output_uri = normalize(output_uri)
        self.stage = stage
        self.config_hash = config_hash
        self.work_uri = join(self.output_uri, ATTEMPTS_DIR, config_hash)

    def committed(self) -> Manifest | None:
        """The manifest if this config already committed here; raise if another config did."""
        try:
            m = read_manifest(self.output_uri)
        except NotCommittedError:
            return None
        if m.stage != self.stage or m.config_hash != self.config_hash:
            raise OutputConflictError(
                f"{self.output_uri} already holds the committed output of stage {m.stage!r} with a "
                f"different config (hash {m.config_hash}, MLflow run {m.mlflow_run_id}; this run's "
                f"hash is {self.config_hash}). Choose another output URI, or delete the old output "
                "first if you mean to replace it."
            )
        return m

    def shard_uri(self, kind: str, index: int, ext: str = "parquet") -> str:
        return join(self.work_uri, kind, f"part-{index:05d}.{ext}")

    def marker_uri(self, index: int) -> str:
        return self.shard_uri("_shards", index, "json")

    def done_shards(self) -> dict[int, dict[str, Any]]:
        """Markers of the shards this config's attempt already finished (for resume)."""
        done = {}
        for uri in list_files(join(self.work_uri, "_shards")):
            name = uri.rsplit("/", 1)[-1]
            if name.startswith("part-") and name.endswith(".json"):
                done[int(name[5:10])] = read_json(uri)
        return done

    def write_shard(
        self, index: int, tables: dict[str, pa.Table], info: dict[str, Any], **parquet_options: Any
    ) -> dict[str, Any]:
        """Write one shard's tables (``{"data": t, "_errors": t}``), then its marker, last."""
        marker: dict[str, Any] = {"index": index, "files": {}, **info}
        for kind, table in tables.items():
            entry = write_parquet(
                self.shard_uri(kind, index), table, rel_to=self.output_uri, **parquet_options
            )
            marker["files"][kind] = dataclasses.asdict(entry)
        write_json(self.marker_uri(index), marker)
        return marker

    def commit(
        self,
        *,
        config: dict[str, Any],
        input_uris: list[str],
        markers: list[dict[str, Any]],
        counts: dict[str, int],
        mlflow_run_id: str | None,
        extra: dict[str, Any] | None = None,
    ) -> Manifest:
        """Write the manifest (the single atomic step that makes the output visible)."""
        markers = sorted(markers, key=lambda m: m["index"])
        files = [FileEntry(**m["files"]["data"]) for m in markers if "data" in m["files"]]
        errors = [FileEntry(**m["files"]["_errors"]) for m in markers if "_errors" in m["files"]]
        manifest = Manifest(
            stage=self.stage,
            config_hash=self.config_hash,
            config=config,
            input_uris=list(input_uris),
            files=files,
            error_files=errors,
            counts=dict(counts),
            mlflow_run_id=mlflow_run_id,
            code_version=code_version(),
            created_at=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            extra=extra or {},
            output_uri=self.output_uri,
        )
        write_json(join(self.output_uri, MANIFEST_NAME), manifest.to_json())
        # Attempts of other configs that never committed are garbage now.
        for uri in list_dirs(join(self.output_uri, ATTEMPTS_DIR)):
            if uri.rstrip("/").rsplit("/", 1)[-1] != self.config_hash:
                remove(uri)
        return manifest


def list_dirs(uri: str) -> list[str]:
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return []
    return sorted(_with_protocol(fs, p["name"]) for p in fs.ls(path, detail=True) if p["type"] == "directory")
