"""The stage kit: what every stage does the same way, in one place.

The layout of an output
-----------------------
::

    <output_uri>/_SUCCESS.json              the manifest: written last, the commit
    <output_uri>/data/train-00000.parquet   data files, one per (shard, split), named for their split
    <output_uri>/data/test-00000.parquet    (a model or a report: one file, e.g. model.safetensors)
    <output_uri>/_errors/rejected-00000.parquet   what a shard rejected, with the reasons
    <output_uri>/.attempts/<identity>/...   work in progress (shards, markers, training checkpoints)

A folder reader (pyarrow, pandas, duckdb, Hugging Face ``datasets``) pointed at ``output_uri``
sees exactly the committed rows: work in progress is under a hidden folder (readers skip ``.``- and
``_``-prefixed paths), and the data files become visible only at the commit. Their names map to
splits as ``datasets`` expects (``train-*``, ``val-*`` -> validation, ``test-*``).

The contract
------------
A stage writing to ``output_uri`` puts its files in its attempt folder, one shard (or one file,
e.g. a model) at a time: the data first, then a small marker ``_shards/part-NNNNN.json`` (a
:class:`ShardMarker`) with its files, row counts and sha256. When every shard is done, the commit:

1. **claim** ``.commit.json`` with a conditional write (created only if absent): of two runs of
   different identities racing for one location exactly one goes on, the other gets an
   :class:`OutputConflictError` (a run of the same identity may finish a commit whose holder is
   gone);
2. **publish**: the data files move from the attempt to their visible names (locally a rename, on
   S3 a server-side copy), stale visible files of an earlier, withdrawn output are removed;
3. **manifest**: ``_SUCCESS.json`` (the :class:`Manifest`: files, counts, figures, the inputs, the
   dataset descriptor) with a conditional write, last;
4. **clean up**: the claim and every attempt folder go.

Readers trust only the manifest. A crash before step 3 leaves no manifest, so nothing looks
complete; a rerun reuses the finished shards of its attempt and writes only the missing ones (and a
crash during publication is finished by the next run of the same identity). A rerun after the commit
is a no-op that returns the recorded result; a different identity at a committed ``output_uri`` is
an error, never an overwrite. Outputs committed in an earlier layout are refused with a message
saying how to rebuild them.

Identity
--------
:func:`identity` is the one rule: the stage name, the config hash (``infra.config.config_hash``:
fields declared as execution, input or output fields are left out) and, by name, the digests of the
inputs (:class:`InputRef`): a committed output's identity, a weights file's sha256, a source
listing's digest. Moving an input to another location changes nothing; changing its content does.

One run
-------
The attempt folder and the claim are each held by a :class:`Lease` (a small JSON file with the
holder's host, pid and a heartbeat): a second run of the same identity started meanwhile (a twin)
waits for the holder instead of writing beside it, and takes over only when the holder is gone.

:class:`StageRun` ties these to MLflow: ``cached()`` returns the committed result (waiting for a
twin first), ``with run:``
opens the stage's child run, ``commit(...)`` writes the manifest, logs the counts and figures, and
returns the :class:`StageResult` that every stage returns and every caller reads the same way.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import io as _io
import logging
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from infra import config as config_lib
from infra import storage, tracking
from infra.lease import Lease
from infra.storage import FileEntry

log = logging.getLogger(__name__)

MANIFEST_NAME = "_SUCCESS.json"
CLAIM_NAME = ".commit.json"
ATTEMPTS_DIR = ".attempts"
DATA_DIR = "data"
ERRORS_DIR = "_errors"
LAYOUT = 2  # the output layout this version writes and reads (1: files under _attempts/, no splits)
LEASE_NAME = "_lease.json"  # in an attempt folder: the live run working on it
SPLITS = ("train", "val", "test")  # file names per split: datasets maps val-* to its validation split


class NotCommittedError(FileNotFoundError):
    """The location holds no committed stage output (no manifest)."""


class OutputConflictError(RuntimeError):
    """The location holds (or is committing) an output of a different identity."""


class InputError(ValueError):
    """An input that cannot be used as given (wrong columns, sizes, labels); the message says what to do."""


# --------------------------------------------------------------------------- identity


@dataclasses.dataclass(frozen=True)
class InputRef:
    """One input of a stage run: its role, where it was read, and the digest its identity counts by."""

    name: str  # the role: "images", "tokenizer", "weights", "source", ...
    uri: str
    digest: str
    kind: Literal["output", "weights", "source"]

    @classmethod
    def output(cls, name: str, manifest: Manifest) -> InputRef:
        return cls(name, manifest.output_uri, manifest.identity, "output")

    @classmethod
    def weights(cls, name: str, uri: str, sha256: str) -> InputRef:
        return cls(name, uri, sha256, "weights")

    @classmethod
    def source(cls, name: str, uri: str, digest: str) -> InputRef:
        return cls(name, uri, digest, "source")


def identity(stage: str, cfg: Any, inputs: Sequence[InputRef]) -> str:
    """The identity of a stage's output: stage, config hash and the inputs' digests, by name."""
    names = [i.name for i in inputs]
    if len(set(names)) != len(names):
        raise ValueError(f"input names must be unique, got {names}")
    h = hashlib.sha256(f"{stage}\0{config_lib.config_hash(cfg)}".encode())
    for ref in sorted(inputs, key=lambda r: r.name):
        h.update(f"\0{ref.name}={ref.digest}".encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- markers and manifests


def _entry(d: dict[str, Any]) -> FileEntry:
    return FileEntry(**d)


def _inside(path: str, where: str) -> str:
    """``path`` if it lies inside an output folder (relative, no ``..``): a manifest never names
    another place."""
    if path.startswith("/") or "://" in path or any(p in ("", ".", "..") for p in path.split("/")):
        raise InputError(
            f"{where}: its manifest lists {path!r}, a path outside the output folder: not a manifest "
            "taming-pipeline wrote; rebuild the output"
        )
    return path


@dataclasses.dataclass(frozen=True)
class ShardMarker:
    """A finished shard of an attempt: its data files (one per split, or one whole file), the file
    of what it rejected, and its counts."""

    index: int
    data: tuple[FileEntry, ...]
    errors: FileEntry | None = None
    counts: dict[str, int] = dataclasses.field(default_factory=dict)  # e.g. read, images
    node: str = ""  # the Ray node that wrote it (infra.cluster.node_id)

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.data)

    @property
    def rejected(self) -> int:
        return self.errors.rows if self.errors is not None else 0

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "data": [dataclasses.asdict(f) for f in self.data],
            "errors": dataclasses.asdict(self.errors) if self.errors is not None else None,
            "counts": dict(self.counts),
            "node": self.node,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ShardMarker:
        errors = _entry(d["errors"]) if d.get("errors") else None
        return cls(int(d["index"]), tuple(_entry(f) for f in d["data"]), errors, dict(d["counts"]), d["node"])


@dataclasses.dataclass
class Manifest:
    stage: str
    identity: str  # see identity(): config hash + the inputs' digests
    config_hash: str  # the config's alone
    config: dict[str, Any]
    inputs: list[InputRef]  # the lineage: what this output was made from
    files: list[FileEntry]  # the output's data files (their visible paths)
    error_files: list[FileEntry]  # rejected inputs with their reasons
    counts: dict[str, int]
    figures: dict[str, float]  # headline numbers (val/psnr, bytes_per_code, ...)
    registered: dict[str, Any] | None  # {"name", "version", "uri"} of a model registered from it
    mlflow_run_id: str | None
    code_version: str
    created_at: str
    dataset: dict[str, Any] | None = None  # the dataset descriptor (infra.image_shards, infra.code_shards)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # other facts (a model's config, ...)
    nodes: dict[str, int] = dataclasses.field(default_factory=dict)  # Ray node id -> shards/workers it ran
    layout: int = LAYOUT
    output_uri: str = ""  # filled in on read: where this manifest was found

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("output_uri")
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], output_uri: str) -> Manifest:
        if d.get("layout") != LAYOUT:
            raise OutputConflictError(
                f"{output_uri} holds a {d.get('stage', 'stage')} output committed by an earlier version of "
                f"taming-pipeline (output layout {d.get('layout', 1)}, this version reads layout {LAYOUT}): "
                "rebuild it: delete the folder (`make clean` for the demo's) and run the stage again, or "
                "choose another output URI"
            )
        d = dict(d)
        d["files"] = [_entry(f) for f in d["files"]]
        d["error_files"] = [_entry(f) for f in d["error_files"]]
        for f in (*d["files"], *d["error_files"]):
            _inside(f.path, output_uri)
        d["inputs"] = [InputRef(**i) for i in d["inputs"]]
        return cls(**d, output_uri=output_uri)

    def data_files(self, split: str | None = None) -> list[FileEntry]:
        """The data files, all or those of ``split``."""
        return [f for f in self.files if split is None or f.split == split]

    def data_uris(self, split: str | None = None) -> list[str]:
        return [storage.join(self.output_uri, f.path) for f in self.data_files(split)]

    def error_uris(self) -> list[str]:
        return [storage.join(self.output_uri, f.path) for f in self.error_files]

    def rows(self, split: str | None = None) -> int:
        return sum(f.rows for f in self.data_files(split))

    def check_sizes(self) -> None:
        """Every data file is there at its committed size (one listing of ``data/``; a model file
        by itself): :class:`InputError` naming the first that is not, before any work reads it."""
        listed = {e.uri: e.size for e in storage.list_entries(storage.join(self.output_uri, DATA_DIR))}
        for f, uri in zip(self.files, self.data_uris()):
            size = listed.get(uri) if f.path.startswith(f"{DATA_DIR}/") else storage.size(uri)
            if size != f.bytes:
                found = "is missing" if size is None else f"holds {size} bytes"
                raise InputError(
                    f"{uri} {found}, its manifest {f.bytes}: the output changed after it was committed; "
                    "rebuild it"
                )

    def verify(self, split: str | None = None) -> None:
        """Read every data file (of ``split``) and check it against its manifest entry, a few at a
        time: for inputs that a reader without checks (Ray Data) consumes next."""
        from concurrent.futures import ThreadPoolExecutor

        files = self.data_files(split)
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda f: read_verified(storage.join(self.output_uri, f.path), f), files))


def read_manifest(output_uri: str) -> Manifest:
    """The committed manifest at ``output_uri``; :class:`NotCommittedError` when there is none."""
    import json

    output_uri = storage.normalize(output_uri)
    uri = storage.join(output_uri, MANIFEST_NAME)
    try:
        data = storage.read_json(uri)
    except FileNotFoundError:
        raise NotCommittedError(
            f"{output_uri} holds no committed stage output (no {MANIFEST_NAME}); "
            "run the stage that writes it first (or check the URI)"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(
            f"{uri} is not a readable manifest ({e}): the output is damaged; rebuild it"
        ) from None
    if not isinstance(data, dict) or "stage" not in data:
        raise InputError(f"{uri} is not a manifest taming-pipeline wrote; rebuild the output")
    return Manifest.from_json(data, output_uri)


def read_verified(uri: str, entry: FileEntry) -> bytes:
    """The bytes of a committed file, checked against its manifest entry (size, then sha256):
    :class:`InputError` naming the file and both digests when they differ."""
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise InputError(f"{uri} is missing: the output changed after it was committed; rebuild it") from None
    if len(data) != entry.bytes:
        raise InputError(
            f"{uri} holds {len(data)} bytes, its manifest {entry.bytes} (sha256 {entry.sha256}): the file "
            "changed after it was committed; rebuild the output"
        )
    if (found := storage.sha256(data)) != entry.sha256:
        raise InputError(
            f"{uri} has sha256 {found}, its manifest {entry.sha256}: the file changed after it was "
            "committed; rebuild the output"
        )
    return data


def read_file(uri: str, entry: FileEntry, columns: list[str] | None = None) -> pa.Table:
    """A committed Parquet file, verified (:func:`read_verified`), as a table."""
    data = read_verified(uri, entry)
    try:
        return pq.read_table(_io.BytesIO(data), columns=columns)
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"{uri} is not a readable Parquet file ({e})") from None


def is_committed(uri: str) -> bool:
    return storage.exists(storage.join(storage.normalize(uri), MANIFEST_NAME))


def input_uris(cfg: Any) -> list[str]:
    """The locations a config reads (its fields declared with ``input_field``), normalised."""
    out = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.metadata.get(config_lib.ROLE) == "input" and isinstance(v, str) and v:
            out.append(v if v.startswith("models:/") else storage.normalize(v))
    return out


def changes(m: Manifest, stage: str, cfg: Any, rerun: Sequence[str] = ()) -> list[str]:
    """Why the committed output ``m`` is not what ``cfg`` would make now ([] = it is): another stage,
    a changed config (the keys that changed), an input whose committed identity changed, or an
    input read from a location in ``rerun`` (outputs that will be made again first). Weights files
    are compared by sha256 when the stage runs, not here."""
    if m.stage != stage:
        return [f"holds stage {m.stage!r}'s output"]
    why = []
    if m.config_hash != config_lib.config_hash(cfg):
        try:
            old = config_lib.flatten(config_lib.identity_dict(config_lib.from_dict(type(cfg), m.config)))
            new = config_lib.flatten(config_lib.identity_dict(cfg))
            diff = [
                f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
                for k in sorted(set(old) | set(new))
                if old.get(k) != new.get(k)
            ]
        except config_lib.ConfigError:  # written by another version of the config class
            diff = []
        why.append("config changed" + (f" ({'; '.join(diff)})" if diff else ""))
    values = input_uris(cfg)
    for r in rerun:
        r = storage.normalize(r)
        hit = [v for v in values if v == r or v.startswith(r.rstrip("/") + "/")]
        if hit:
            why.append(f"input {hit[0]} is made again first")
    if not any(w.startswith("input") for w in why):
        current = {
            read_manifest(v).identity for v in values if not v.startswith("models:/") and is_committed(v)
        }
        for ref in m.inputs:
            if ref.kind == "output" and ref.digest not in current:
                why.append(f"input {ref.name} changed (recorded {ref.uri} at identity {ref.digest})")
    return why


def uncommit(output_uri: str) -> str:
    """Withdraw the committed output at ``output_uri``: its manifest moves to ``_replaced/`` (kept
    for the record), so the location is uncommitted and the next commit there replaces the old
    output's files. Returns where the old manifest went."""
    output_uri = storage.normalize(output_uri)
    m = read_manifest(output_uri)
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%d-%H%M%S")
    kept = storage.join(output_uri, "_replaced", f"{stamp}-{m.identity}.json")
    storage.write_json(kept, m.to_json())
    storage.remove(storage.join(output_uri, MANIFEST_NAME))
    log.warning(
        "%s: withdrew the committed %s output (identity %s; manifest kept at %s)",
        output_uri,
        m.stage,
        m.identity,
        kept,
    )
    return kept


def read_rows(
    uri: str, files: Sequence[FileEntry], rows: Sequence[tuple[int, int]], columns: list[str]
) -> pa.Table:
    """The rows (file number, row) of a committed output, in that order, ``columns`` of them: one
    verified read per file; ``files``: the committed data files the file numbers index."""
    by_file: dict[int, list[int]] = {}
    for fi, r in rows:
        by_file.setdefault(int(fi), []).append(int(r))
    tables, where, base = [], {}, 0
    for fi, rs in by_file.items():
        f, wanted = files[fi], sorted(set(rs))
        tables.append(read_file(storage.join(uri, f.path), f, columns).take(wanted))
        where.update({(fi, r): base + j for j, r in enumerate(wanted)})
        base += len(wanted)
    if not tables:
        return pa.table({c: [] for c in columns})
    return pa.concat_tables(tables).take([where[(int(fi), int(r))] for fi, r in rows])


def read_committed_table(
    output_uri: str, columns: list[str] | None = None, split: str | None = None, verify: bool = True
) -> pa.Table:
    """The data rows of a committed output (only the files its manifest lists; those of ``split``
    when given), in the order of its files, each verified against its manifest entry (``verify``
    false: only the columns are read, the files' sizes checked; for a plan's look at a few columns
    of data that is verified before the work reads it)."""
    m = read_manifest(output_uri)
    if not verify:
        m.check_sizes()
    tables = [
        read_file(storage.join(m.output_uri, f.path), f, columns)
        if verify
        else _read_columns(storage.join(m.output_uri, f.path), f, columns)
        for f in m.data_files(split)
    ]
    return pa.concat_tables(tables) if tables else pa.table({})


def _read_columns(uri: str, entry: FileEntry, columns: list[str] | None) -> pa.Table:
    """Some columns of a committed file, unverified; a file that does not parse is verified to say
    why (its digest differs from the manifest's), else named as unreadable."""
    try:
        return storage.read_parquet(uri, columns)
    except (pa.ArrowInvalid, OSError) as e:
        read_verified(uri, entry)
        raise InputError(f"{uri} is not a readable Parquet file ({e})") from None


def held_out_split(m: Manifest) -> str:
    """The split to validate on: ``val``, else ``test``, else (with a warning) ``train``."""
    split = next((s for s in ("val", "test", "train") if m.rows(s)), None)
    if split is None:
        raise InputError(f"{m.output_uri} has no rows to validate on")
    if split == "train":
        log.warning("%s has no val or test split: validating on train rows", m.output_uri)
    return split


def read_held_out(uri: str, columns: list[str], limit: int | None = None) -> tuple[pa.Table, str]:
    """The held-out rows of a committed output for validation (:func:`held_out_split`), at most
    ``limit`` of them, and the split's name."""
    split = held_out_split(read_manifest(uri))
    return read_committed_table(uri, columns, split).slice(0, limit), split


# --------------------------------------------------------------------------- the output of one identity


def _split_order(split: str) -> tuple[int, str]:
    return (SPLITS.index(split) if split in SPLITS else len(SPLITS), split)


class StageOutput:
    """The output location of one stage identity (see the module docstring for the layout and the
    contract)."""

    def __init__(self, output_uri: str, stage: str, identity: str):
        self.output_uri = storage.normalize(output_uri)
        self.stage = stage
        self.identity = identity
        self.work_uri = storage.join(self.output_uri, ATTEMPTS_DIR, identity)
        self._claim_uri = storage.join(self.output_uri, CLAIM_NAME)
        self._claim = Lease(
            self._claim_uri, ("stage", "identity"), stage=stage, identity=identity, registered=None
        )
        self._attempt = Lease(storage.join(self.work_uri, LEASE_NAME), stage=stage)
        self.inherited: dict[str, Any] | None = None  # what a dead claimant had registered (taken over)

    def committed(self) -> Manifest | None:
        """The manifest if this identity already committed here; raise if another identity did, or
        is committing here now."""
        try:
            m = read_manifest(self.output_uri)
        except NotCommittedError:
            self._check_claim()
            return None
        self._check_same(m)
        return m

    def _check_same(self, m: Manifest) -> None:
        if m.stage != self.stage or m.identity != self.identity:
            raise OutputConflictError(
                f"{self.output_uri} already holds the committed output of stage {m.stage!r} with a "
                f"different config or inputs (identity {m.identity}, MLflow run {m.mlflow_run_id}; this "
                f"run's identity is {self.identity}). Choose another output URI, or delete the old "
                "output first if you mean to replace it."
            )

    def _check_claim(self) -> None:
        """A commit of another identity under way here (or one that stopped half-way): the conflict."""
        claim = self._claim.holder()
        if claim is not None and claim.get("identity") != self.identity:
            raise OutputConflictError(
                f"{self.output_uri} is being committed by another run (stage {claim.get('stage')!r}, "
                f"identity {claim.get('identity')}, since {claim.get('created_at')}; this run's identity is "
                f"{self.identity}), or such a run stopped while committing: rerun that run to finish it, "
                f"or delete {self._claim_uri} and the folder's data/ to start over. Or choose another "
                "output URI."
            )

    def _shard_uri(self, folder: str, name: str) -> str:
        return storage.join(self.work_uri, folder, name)

    def marker_uri(self, index: int) -> str:
        return self._shard_uri("_shards", f"part-{index:05d}.json")

    def done_shards(self) -> dict[int, ShardMarker]:
        """Markers of the shards this identity's attempt already finished (for resume), of those
        whose files are all there at their recorded size; the others are done again."""
        done = {}
        sizes = {e.uri: e.size for e in storage.list_entries(self.work_uri)}
        for uri in sorted(sizes):
            name = uri.rsplit("/", 1)[-1]
            if "/_shards/" not in uri or not (name.startswith("part-") and name.endswith(".json")):
                continue
            marker = ShardMarker.from_json(storage.read_json(uri))
            changed = [
                f.path for f in (*marker.data, marker.errors) if f and sizes.get(self.file_uri(f)) != f.bytes
            ]
            if changed:
                log.warning(
                    "%s: shard %d is done again: %s changed since", self.stage, marker.index, changed[0]
                )
                continue
            done[marker.index] = marker
        return done

    def file_uri(self, entry: FileEntry) -> str:
        """Where a file of a finished shard is now (in the attempt until the commit publishes it)."""
        return storage.join(self.output_uri, entry.path)

    def _finish(self, index: int, data: list[FileEntry], errors: FileEntry | None, counts) -> ShardMarker:
        from infra.cluster import node_id

        marker = ShardMarker(index, tuple(data), errors, dict(counts), node_id())
        storage.write_json(self.marker_uri(index), marker.to_json())  # last: the shard is done
        return marker

    def write_shard(
        self,
        index: int,
        data: pa.Table,
        counts: dict[str, int],
        *,
        errors: pa.Table | None = None,
        **parquet_options: Any,
    ) -> ShardMarker:
        """Write one shard's rows, a file per split when they have a ``split`` column
        (``data/<split>-NNNNN.parquet``, rows in their order), its ``errors`` when there are any,
        then its marker, last."""
        if "split" in data.column_names:
            splits = sorted(set(data["split"].to_pylist()), key=_split_order)
            parts = [(s, data.filter(pc.equal(data["split"], s))) for s in splits]
        else:
            parts = [(None, data)] if data.num_rows else []
        files = [
            storage.write_parquet(
                self._shard_uri(DATA_DIR, f"{split or 'part'}-{index:05d}.parquet"),
                table,
                rel_to=self.output_uri,
                split=split,
                **parquet_options,
            )
            for split, table in parts
        ]
        err = None
        if errors is not None and errors.num_rows:
            uri = self._shard_uri(ERRORS_DIR, f"rejected-{index:05d}.parquet")
            err = storage.write_parquet(uri, errors, rel_to=self.output_uri)
        return self._finish(index, files, err, counts)

    def write_file(
        self, index: int, name: str, data: bytes, counts: dict[str, int] | None = None
    ) -> ShardMarker:
        """Write one whole file (a model, a report) as shard ``index``'s data, then its marker; the
        commit publishes it as ``<output_uri>/<name>``."""
        entry = storage.write_file(storage.join(self.work_uri, name), data, rel_to=self.output_uri)
        return self._finish(index, [entry], None, counts or {})

    # ----------------------------------------------------------------------- the commit

    def _committed_or_none(self) -> Manifest | None:
        try:
            m = read_manifest(self.output_uri)
        except NotCommittedError:
            return None
        self._check_same(m)
        return m

    def claim(self) -> Manifest | None:
        """Hold the commit of this location before writing anything visible or registering a model.

        None: this run holds the claim and may publish and commit. The manifest: a run of this
        identity committed first (this run's work is not needed; write nothing). Another identity's
        manifest or claim: the :class:`OutputConflictError`. A twin of this identity (same config
        and inputs, another run) that holds the claim is waited for; a claim whose run is gone (it
        died or failed while committing) is taken over, with the model it had registered
        (:attr:`inherited`), so a commit that stopped half-way is finished, not repeated."""
        while not self._claim.held:
            if (m := self._committed_or_none()) is not None:
                return m
            held = self._claim.try_acquire()
            if held is None:
                # The committer writes the manifest before it drops the claim, so a claim taken after
                # that finds the manifest here, before publishing anything over the committed files.
                if (m := self._committed_or_none()) is not None:
                    self._claim.release()
                    return m
                if (left := self._claim.taken_from) is not None:
                    log.warning(
                        "%s: finishing the commit a run of this identity left half-way at %s (claimed %s)",
                        self.stage,
                        self.output_uri,
                        left.get("created_at"),
                    )
                    self.inherited = left.get("registered")
                    self._claim.renew(registered=self.inherited)
                break
            self._check_claim()  # another identity's: the conflict
            time.sleep(0.5)  # a twin is committing: its manifest comes within seconds
        return None

    def renew_claim(self, registered: dict[str, Any] | None = None) -> None:
        """Record a model registered under the held claim, so that a run taking over after a crash
        does not register it twice."""
        self.inherited = registered if registered is not None else self.inherited
        self._claim.renew(registered=self.inherited)

    def abandon(self) -> None:
        """After a failure: leave a held claim marked as left (the next run of this identity
        finishes the commit at once), and let go of the attempt."""
        self._claim.release(remove=False)
        self._attempt.release()

    def hold_attempt(self) -> Manifest | None:
        """Become the one run working on this identity's attempt. A live twin (same config and
        inputs, another run) working on it is waited for: its manifest, when it commits, is
        returned; when it stops without committing, this run takes the attempt over and resumes it."""
        waiting = False
        while True:
            if (m := self.committed()) is not None:
                return m
            held = self._attempt.try_acquire()
            if held is None:
                if (m := self.committed()) is not None:  # committed just before we took it
                    self._attempt.release()
                    return m
                if self._attempt.taken_from is not None:
                    log.info(
                        "%s: resuming the attempt a run that stopped left in %s", self.stage, self.work_uri
                    )
                return None
            if not waiting:
                log.info(
                    "%s: another run of this config and inputs is working on %s (pid %s on %s, since %s): "
                    "waiting for it",
                    self.stage,
                    self.output_uri,
                    held.get("pid"),
                    held.get("host"),
                    held.get("created_at"),
                )
                waiting = True
            time.sleep(1.0)

    def release_attempt(self) -> None:
        self._attempt.release()

    def _visible(self, entry: FileEntry) -> FileEntry:
        return dataclasses.replace(entry, path=storage.relative(self.file_uri(entry), self.work_uri))

    def _publish(self, entries: list[FileEntry]) -> list[FileEntry]:
        """Move the attempt's files to their visible paths (stale visible data files removed first);
        returns their visible entries. Safe to run again after a crash half-way."""
        visible = [self._visible(e) for e in entries]
        keep = {storage.join(self.output_uri, v.path) for v in visible}
        for folder in (DATA_DIR, ERRORS_DIR):
            for uri in storage.list_files(storage.join(self.output_uri, folder)):
                if uri not in keep:
                    storage.remove(uri)
        for entry, v in zip(entries, visible):
            src, dst = self.file_uri(entry), storage.join(self.output_uri, v.path)
            try:
                storage.move(src, dst)
            except FileNotFoundError:  # moved already: by an earlier, interrupted commit or a twin run
                if storage.size(dst) != entry.bytes:
                    raise OSError(f"{self.stage}: {src} is gone and {dst} is not its copy") from None
        return visible

    def commit(
        self,
        *,
        config: dict[str, Any],
        config_hash: str,
        inputs: Sequence[InputRef],
        markers: Sequence[ShardMarker],
        counts: dict[str, int],
        figures: dict[str, float] | None = None,
        registered: dict[str, Any] | None = None,
        mlflow_run_id: str | None = None,
        dataset: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
        nodes: dict[str, int] | None = None,
    ) -> tuple[Manifest, bool]:
        """Claim, publish, write the manifest, clean up (see the module docstring).

        ``nodes``: where the work ran (Ray node id -> count), by default the markers' nodes.
        Returns ``(manifest, True)`` when this call committed, ``(winner, False)`` when a concurrent
        run of the same identity committed first; a different identity first is an
        :class:`OutputConflictError`.
        """
        markers = sorted(markers, key=lambda m: m.index)
        if (existing := self.claim()) is not None:
            return existing, False
        try:
            return self._commit_claimed(markers, dict(
                config=config, config_hash=config_hash, inputs=list(inputs), counts=dict(counts),
                figures=dict(figures or {}), registered=registered, mlflow_run_id=mlflow_run_id,
                dataset=dataset, extra=extra or {},
            ), nodes)  # fmt: skip
        except BaseException:
            self._claim.release(remove=False)
            raise

    def _commit_claimed(
        self, markers: list[ShardMarker], fields: dict[str, Any], nodes: dict[str, int] | None
    ) -> tuple[Manifest, bool]:
        data = [f for m in markers for f in m.data]
        published = self._publish(data + [m.errors for m in markers if m.errors is not None])
        files, error_files = published[: len(data)], published[len(data) :]
        manifest = Manifest(
            stage=self.stage,
            identity=self.identity,
            files=files,
            error_files=error_files,
            code_version=tracking.code_version(),
            created_at=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            nodes=dict(nodes) if nodes is not None else dict(Counter(m.node for m in markers if m.node)),
            output_uri=self.output_uri,
            **fields,
        )
        blob = storage.to_json_bytes(manifest.to_json())
        if not storage.create_bytes(storage.join(self.output_uri, MANIFEST_NAME), blob):
            self._claim.release()
            winner = read_manifest(self.output_uri)
            self._check_same(winner)  # another identity committed first: the conflict error
            return winner, False
        self._claim.release()
        self._attempt.release()
        self._remove_attempts()
        return manifest, True

    def _remove_attempts(self) -> None:
        """After the commit every attempt is garbage, except those a live run of another identity
        still works in (it learns of the conflict at its next shard and removes its own)."""
        for folder in storage.list_dirs(storage.join(self.output_uri, ATTEMPTS_DIR)):
            record = Lease(storage.join(folder, LEASE_NAME)).holder()
            if folder != self.work_uri and record is not None and not Lease.gone(record):
                continue
            storage.remove(folder)
        attempts = storage.join(self.output_uri, ATTEMPTS_DIR)
        if not storage.list_files(attempts):
            storage.remove(attempts)
        storage.remove(storage.join(self.output_uri, "_attempts"))  # those of layout 1


# --------------------------------------------------------------------------- results and runs


@dataclasses.dataclass(frozen=True)
class StageResult:
    """What every stage's ``run`` returns."""

    stage: str
    output_uri: str
    cached: bool  # True when the output was already committed: nothing was redone
    counts: dict[str, int]
    figures: dict[str, float]
    manifest: Manifest

    @classmethod
    def of(cls, m: Manifest, cached: bool) -> StageResult:
        return cls(m.stage, m.output_uri, cached, dict(m.counts), dict(m.figures), m)

    @property
    def model_uri(self) -> str | None:
        """``models:/<name>/<version>`` of the model registered from this output, if any."""
        return self.manifest.registered["uri"] if self.manifest.registered else None

    def summary(self) -> dict[str, Any]:
        """What a stage's command prints and a pipeline records: output, cached, counts, figures."""
        out: dict[str, Any] = {"stage": self.stage, "output_uri": self.output_uri, "cached": self.cached}
        out.update(self.counts)
        out.update(self.figures)
        if self.model_uri:
            out["registered_model"] = self.model_uri
        return out


def counted(n: int, noun: str) -> str:
    """``1 shard``, ``7 shards``, ``70,000 images``: a count for a plan's summary."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def tally(stage: str, markers: Sequence[ShardMarker], expected: int) -> dict[str, int]:
    """``read``, ``written`` and ``rejected`` over the markers, checked: ``expected == read ==
    written + rejected``, so a lost or doubled row fails the stage instead of passing silently."""
    read = sum(m.counts.get("read", 0) for m in markers)
    written = sum(m.rows for m in markers)
    rejected = sum(m.rejected for m in markers)
    if read != expected or read != written + rejected:
        raise RuntimeError(
            f"{stage} counts do not add up: expected {expected}, read {read}, written {written}, "
            f"rejected {rejected}"
        )
    return {"read": read, "written": written, "rejected": rejected}


class StageRun:
    """One run of a stage: its identity and output, its MLflow child run, its commit.

    p = plan(cfg)
    job = StageRun(STAGE, cfg, p.inputs, experiment)
    if (done := job.cached()) is not None:
        return done
    with job:
        markers, _ = pool.map_items(Worker, args, items, job.out, cfg.resources)
        return job.commit(markers, counts=..., dataset=p.dataset)
    """

    def __init__(self, stage: str, cfg: Any, inputs: Sequence[InputRef], experiment: str):
        if not getattr(cfg, "output_uri", ""):
            raise config_lib.ConfigError(f"{stage}.output_uri is not set")
        self.stage, self.cfg, self.inputs, self.experiment = stage, cfg, list(inputs), experiment
        self.identity = identity(stage, cfg, self.inputs)
        self.out = StageOutput(cfg.output_uri, stage, self.identity)
        self.run_id: str | None = None
        self.nodes: dict[str, int] | None = None  # set by work that writes no markers (Ray Train workers)
        self._ctx = None
        self._t0 = 0.0

    def cached(self) -> StageResult | None:
        """The committed result of this identity (a no-op rerun). None: not committed yet, and this
        run now holds the identity's attempt (a twin run working on it is waited for first: its
        result is returned when it commits, its attempt resumed when it stops without), so that
        ``with run:`` follows at once."""
        m = self.out.committed()
        if m is None and (m := self.out.hold_attempt()) is not None:
            return self.lost_to(m)
        if m is None:
            return None
        log.info(
            "%s: %s is already committed with this config and inputs; nothing to do", self.stage, m.output_uri
        )
        return StageResult.of(m, cached=True)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self._t0

    def __enter__(self) -> StageRun:
        self._ctx = tracking.stage_run(
            self.stage, self.cfg, [i.uri for i in self.inputs], self.out.output_uri, self.experiment
        )
        self.run_id = self._ctx.__enter__()
        tracking.set_tags({"identity": self.identity})
        # the MLflow run of an earlier attempt that was killed stays RUNNING: mark it failed
        runs = storage.join(self.out.work_uri, "_mlflow_run.json")
        if storage.exists(runs):
            tracking.fail_if_running(storage.read_json(runs)["run_id"])
        storage.write_json(runs, {"run_id": self.run_id})
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is not None and not isinstance(exc, OutputConflictError):
            try:  # a concurrent run of another identity committed here: that is the error to report
                self.out.committed()
            except OutputConflictError as conflict:
                self.out.abandon()
                self._drop_attempt()
                self._ctx.__exit__(type(conflict), conflict, None)
                raise conflict from exc
            except Exception:  # noqa: BLE001 - the original error stays the one reported
                pass
        if exc is not None:
            self.out.abandon()
        if isinstance(exc, OutputConflictError):
            self._drop_attempt()
        self.out.release_attempt()
        return bool(self._ctx.__exit__(exc_type, exc, tb))

    def _drop_attempt(self) -> None:
        """Another identity owns the location now: this run's attempt can never commit there."""
        try:
            storage.remove(self.out.work_uri)
        except OSError as e:
            log.warning("%s: could not remove %s: %s", self.stage, self.out.work_uri, e)

    def commit(
        self,
        markers: Sequence[ShardMarker],
        *,
        counts: dict[str, int],
        figures: dict[str, float] | None = None,
        dataset: Any = None,
        extra: dict[str, Any] | None = None,
        registered: dict[str, Any] | None = None,
        step: int | None = None,
    ) -> StageResult:
        """Log the counts (``<stage>/<name>``), the seconds and the figures (``val/psnr`` as it is,
        ``images_per_s`` as ``<stage>/images_per_s``) at ``step``, then commit. ``dataset``: the
        output's descriptor (a dataclass with ``to_json()``)."""
        figures = dict(figures or {})
        metrics = {f"{self.stage}/{k}": v for k, v in counts.items()}
        metrics[f"{self.stage}/seconds"] = self.seconds
        metrics.update({k if "/" in k else f"{self.stage}/{k}": v for k, v in figures.items()})
        tracking.log_metrics(metrics, step=step)
        manifest, ours = self.out.commit(
            config=config_lib.to_dict(self.cfg),
            config_hash=config_lib.config_hash(self.cfg),
            inputs=self.inputs,
            markers=markers,
            counts=counts,
            figures=figures,
            registered=registered,
            mlflow_run_id=self.run_id,
            dataset=dataset.to_json() if dataset is not None else None,
            extra=extra,
            nodes=self.nodes,
        )
        if ours:
            log.info("%s: committed %s in %.1f s %s", self.stage, manifest.output_uri, self.seconds, counts)
        else:
            self.lost_to(manifest)
        return StageResult.of(manifest, cached=not ours)

    def lost_to(self, winner: Manifest) -> StageResult:
        """A run of this identity committed first: its result stands, this run's work is dropped."""
        log.info(
            "%s: %s was committed by another run of this config and inputs meanwhile (MLflow run %s); "
            "its result stands and this run's is dropped",
            self.stage,
            winner.output_uri,
            winner.mlflow_run_id,
        )
        return StageResult.of(winner, cached=True)
