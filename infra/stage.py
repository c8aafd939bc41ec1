"""The stage kit: what every stage does the same way, in one place.

The contract
------------
A stage writing to ``output_uri`` puts its files in an attempt folder,
``output_uri/_attempts/<identity>/``, one shard (or one file, e.g. a model) at a time: the data
first, then a small marker ``_shards/part-NNNNN.json`` (a :class:`ShardMarker`) with its row counts
and sha256. When every shard is done the stage writes ``output_uri/_SUCCESS.json`` (the
:class:`Manifest`) with a conditional write: it is created only if absent, so of two runs racing
for one location exactly one commits and the other gets an :class:`OutputConflictError` (or, when
it computed the same identity, the winner's result). Readers trust only the manifest, so a crash at
any point leaves nothing that looks complete, and a rerun reuses the finished shards of its attempt
folder and writes only the missing ones. A rerun after the commit is a no-op that returns the
recorded result; a different identity at a committed ``output_uri`` is an error, never an overwrite.

Identity
--------
:func:`identity` is the one rule: the stage name, the config hash (``infra.config.config_hash``:
fields declared as execution, input or output fields are left out) and, by name, the digests of the
inputs (:class:`InputRef`): a committed output's identity, a weights file's sha256, a source
listing's digest. Moving an input to another location changes nothing; changing its content does.

One run
-------
:class:`StageRun` ties these to MLflow: ``cached()`` returns the committed result, ``with run:``
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
import pyarrow.parquet as pq

from infra import config as config_lib
from infra import storage, tracking
from infra.storage import FileEntry

log = logging.getLogger(__name__)

MANIFEST_NAME = "_SUCCESS.json"
ATTEMPTS_DIR = "_attempts"


class NotCommittedError(FileNotFoundError):
    """The location holds no committed stage output (no manifest)."""


class OutputConflictError(RuntimeError):
    """The location holds a committed output of a different identity."""


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


@dataclasses.dataclass(frozen=True)
class ShardMarker:
    """A finished shard of an attempt: its files by kind (``data``, ``_errors``, ...) and counts."""

    index: int
    files: dict[str, FileEntry]
    counts: dict[str, int] = dataclasses.field(default_factory=dict)  # e.g. read, images
    node: str = ""  # the Ray node that wrote it (infra.cluster.node_id)

    def rows(self, kind: str = "data") -> int:
        return self.files[kind].rows if kind in self.files else 0

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "files": {k: dataclasses.asdict(v) for k, v in self.files.items()},
            "counts": dict(self.counts),
            "node": self.node,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ShardMarker:
        files = {k: FileEntry(**v) for k, v in d["files"].items()}
        return cls(int(d["index"]), files, dict(d["counts"]), d.get("node", ""))


@dataclasses.dataclass
class Manifest:
    stage: str
    identity: str  # see identity(): config hash + the inputs' digests
    config_hash: str  # the config's alone
    config: dict[str, Any]
    inputs: list[InputRef]  # the lineage: what this output was made from
    files: list[FileEntry]  # the output's data files
    error_files: list[FileEntry]  # rejected inputs with their reasons
    counts: dict[str, int]
    figures: dict[str, float]  # headline numbers (val/psnr, bytes_per_code, ...)
    registered: dict[str, Any] | None  # {"name", "version", "uri"} of a model registered from it
    mlflow_run_id: str | None
    code_version: str
    created_at: str
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    nodes: dict[str, int] = dataclasses.field(default_factory=dict)  # Ray node id -> shards/workers it ran
    output_uri: str = ""  # filled in on read: where this manifest was found

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("output_uri")
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], output_uri: str) -> Manifest:
        if "identity" not in d:
            raise OutputConflictError(
                f"{output_uri} holds an output committed by an older version of taming-pipeline "
                f"(stage {d.get('stage')!r}, no identity recorded): delete it, or choose another output URI"
            )
        d = dict(d)
        d["files"] = [FileEntry(**f) for f in d["files"]]
        d["error_files"] = [FileEntry(**f) for f in d.get("error_files", [])]
        d["inputs"] = [InputRef(**i) for i in d["inputs"]]
        return cls(**d, output_uri=output_uri)

    def data_uris(self) -> list[str]:
        return [storage.join(self.output_uri, f.path) for f in self.files]

    def error_uris(self) -> list[str]:
        return [storage.join(self.output_uri, f.path) for f in self.error_files]

    def upstream(self) -> list[Manifest]:
        """The committed outputs this one was made from (one hop of the lineage)."""
        return [read_manifest(i.uri) for i in self.inputs if i.kind == "output"]


def read_manifest(output_uri: str) -> Manifest:
    """The committed manifest at ``output_uri``; :class:`NotCommittedError` when there is none."""
    output_uri = storage.normalize(output_uri)
    uri = storage.join(output_uri, MANIFEST_NAME)
    if not storage.exists(uri):
        raise NotCommittedError(
            f"{output_uri} holds no committed stage output (no {MANIFEST_NAME}); "
            "run the stage that writes it first (or check the URI)"
        )
    return Manifest.from_json(storage.read_json(uri), output_uri)


def is_committed(uri: str) -> bool:
    return storage.exists(storage.join(storage.normalize(uri), MANIFEST_NAME))


def _input_values(cfg: Any) -> list[str]:
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
            old = config_lib.identity_dict(config_lib.from_dict(type(cfg), m.config))
            new = config_lib.identity_dict(cfg)
            diff = [
                f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
                for k in sorted(set(old) | set(new))
                if old.get(k) != new.get(k)
            ]
        except config_lib.ConfigError:  # written by another version of the config class
            diff = []
        why.append("config changed" + (f" ({'; '.join(diff)})" if diff else ""))
    values = _input_values(cfg)
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


def _identity_at(uri: str) -> str | None:
    """The identity committed at ``uri`` (one read), None when nothing is."""
    try:
        return read_manifest(uri).identity
    except NotCommittedError:
        return None


def uncommit(output_uri: str) -> str:
    """Withdraw the committed output at ``output_uri``: its manifest moves to ``_replaced/`` (kept
    for the record), so the location is uncommitted and the next commit there removes the old
    attempt's files. Returns where the old manifest went."""
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


def column_names(m: Manifest) -> list[str]:
    """The columns of a committed Parquet output (from its first data file's schema; [] if empty)."""
    return storage.parquet_schema(m.data_uris()[0]).names if m.files else []


def lineage_value(m: Manifest, key: str, hops: int = 8) -> Any:
    """``extra[key]`` of ``m`` or of the nearest output it was made from (e.g. segmentation labels)."""
    for _ in range(hops):
        if m.extra.get(key) is not None:
            return m.extra[key]
        ups = m.upstream()
        if not ups:
            return None
        m = ups[0]
    return None


def read_committed_table(output_uri: str, columns: list[str] | None = None, verify: bool = False) -> pa.Table:
    """All data rows of a committed output (only the files its manifest lists)."""
    m = read_manifest(output_uri)
    tables = []
    for entry, uri in zip(m.files, m.data_uris()):
        if verify:
            data = storage.read_bytes(uri)
            if storage.sha256(data) != entry.sha256:
                raise OSError(f"{uri}: sha256 does not match the manifest (file changed after commit)")
            tables.append(pq.read_table(_io.BytesIO(data), columns=columns))
        else:
            tables.append(storage.read_parquet(uri, columns))
    if not tables:
        return pa.table({})
    return pa.concat_tables(tables)


def read_held_out(uri: str, columns: list[str], limit: int | None = None) -> tuple[pa.Table, str]:
    """The held-out rows of a committed output for validation: the ``val`` split, else ``test``,
    else (with a warning, and the split name saying so) ``train``; at most ``limit`` rows."""
    import numpy as np

    t = read_committed_table(uri, list(dict.fromkeys([*columns, "split"])))
    splits = np.asarray(t["split"].to_pylist())
    split = next((s for s in ("val", "test", "train") if (splits == s).any()), None)
    if split is None:
        raise InputError(f"{uri} has no rows to validate on")
    if split == "train":
        log.warning("%s has no val or test split: validating on train rows", uri)
    return t.filter(splits == split).slice(0, limit), split


# --------------------------------------------------------------------------- the output of one identity


class StageOutput:
    """The output location of one stage identity (see the module docstring for the contract)."""

    def __init__(self, output_uri: str, stage: str, identity: str):
        self.output_uri = storage.normalize(output_uri)
        self.stage = stage
        self.identity = identity
        self.work_uri = storage.join(self.output_uri, ATTEMPTS_DIR, identity)

    def committed(self) -> Manifest | None:
        """The manifest if this identity already committed here; raise if another one did."""
        try:
            m = read_manifest(self.output_uri)
        except NotCommittedError:
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

    def shard_uri(self, kind: str, index: int, ext: str = "parquet") -> str:
        return storage.join(self.work_uri, kind, f"part-{index:05d}.{ext}")

    def file_uri(self, marker: ShardMarker, kind: str = "data") -> str:
        """Where a finished shard's file of ``kind`` is."""
        return storage.join(self.output_uri, marker.files[kind].path)

    def marker_uri(self, index: int) -> str:
        return self.shard_uri("_shards", index, "json")

    def done_shards(self) -> dict[int, ShardMarker]:
        """Markers of the shards this identity's attempt already finished (for resume)."""
        done = {}
        for uri in storage.list_files(storage.join(self.work_uri, "_shards")):
            name = uri.rsplit("/", 1)[-1]
            if name.startswith("part-") and name.endswith(".json"):
                marker = ShardMarker.from_json(storage.read_json(uri))
                done[marker.index] = marker
        return done

    def _finish(self, index: int, files: dict[str, FileEntry], counts: dict[str, int]) -> ShardMarker:
        from infra.cluster import node_id

        marker = ShardMarker(index, files, dict(counts), node_id())
        storage.write_json(self.marker_uri(index), marker.to_json())  # last: the shard is done
        return marker

    def write_shard(
        self, index: int, tables: dict[str, pa.Table], counts: dict[str, int], **parquet_options: Any
    ) -> ShardMarker:
        """Write one shard's tables (``{"data": t, "_errors": t}``), then its marker, last."""
        files = {
            kind: storage.write_parquet(
                self.shard_uri(kind, index), table, rel_to=self.output_uri, **parquet_options
            )
            for kind, table in tables.items()
        }
        return self._finish(index, files, counts)

    def write_file(
        self, index: int, name: str, data: bytes, counts: dict[str, int] | None = None
    ) -> ShardMarker:
        """Write one whole file (a model, a metrics file) as shard ``index``'s data, then its marker."""
        entry = storage.write_file(storage.join(self.work_uri, name), data, rel_to=self.output_uri)
        return self._finish(index, {"data": entry}, counts or {})

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
        extra: dict[str, Any] | None = None,
        nodes: dict[str, int] | None = None,
    ) -> tuple[Manifest, bool]:
        """Write the manifest if none exists yet (the single step that makes the output visible).

        ``nodes``: where the work ran (Ray node id -> count), by default the markers' nodes.
        Returns ``(manifest, True)`` when this call committed, ``(winner, False)`` when a concurrent
        run of the same identity committed first; a different identity first is an
        :class:`OutputConflictError`.
        """
        markers = sorted(markers, key=lambda m: m.index)
        manifest = Manifest(
            stage=self.stage,
            identity=self.identity,
            config_hash=config_hash,
            config=config,
            inputs=list(inputs),
            files=[m.files["data"] for m in markers if "data" in m.files],
            error_files=[m.files["_errors"] for m in markers if "_errors" in m.files],
            counts=dict(counts),
            figures=dict(figures or {}),
            registered=registered,
            mlflow_run_id=mlflow_run_id,
            code_version=tracking.code_version(),
            created_at=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            extra=extra or {},
            nodes=dict(nodes) if nodes is not None else dict(Counter(m.node for m in markers if m.node)),
            output_uri=self.output_uri,
        )
        blob = storage.to_json_bytes(manifest.to_json())
        if not storage.create_bytes(storage.join(self.output_uri, MANIFEST_NAME), blob):
            winner = read_manifest(self.output_uri)
            self._check_same(winner)  # another identity committed first: the conflict error
            return winner, False
        # Attempts of other identities can never commit here now: garbage.
        for uri in storage.list_dirs(storage.join(self.output_uri, ATTEMPTS_DIR)):
            if uri.rstrip("/").rsplit("/", 1)[-1] != self.identity:
                storage.remove(uri)
        return manifest, True


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


def tally(stage: str, markers: Sequence[ShardMarker], expected: int) -> dict[str, int]:
    """``read``, ``written`` and ``rejected`` over the markers, checked: ``expected == read ==
    written + rejected``, so a lost or doubled row fails the stage instead of passing silently."""
    read = sum(m.counts.get("read", 0) for m in markers)
    written = sum(m.rows("data") for m in markers)
    rejected = sum(m.rows("_errors") for m in markers)
    if read != expected or read != written + rejected:
        raise RuntimeError(
            f"{stage} counts do not add up: expected {expected}, read {read}, written {written}, "
            f"rejected {rejected}"
        )
    return {"read": read, "written": written, "rejected": rejected}


class StageRun:
    """One run of a stage: its identity and output, its MLflow child run, its commit.

    job = StageRun(STAGE, cfg, cfg.output_uri, [InputRef.output("images", images)], experiment)
    if (done := job.cached()) is not None:
        return done
    with job:
        markers, _ = pool.map_items(Worker, args, items, job.out)
        return job.commit(markers, counts=...)
    """

    def __init__(self, stage: str, cfg: Any, output_uri: str, inputs: Sequence[InputRef], experiment: str):
        if not output_uri:
            raise config_lib.ConfigError(f"{stage}.output_uri is not set")
        self.stage, self.cfg, self.inputs, self.experiment = stage, cfg, list(inputs), experiment
        self.identity = identity(stage, cfg, self.inputs)
        self.out = StageOutput(output_uri, stage, self.identity)
        self.run_id: str | None = None
        self.nodes: dict[str, int] | None = None  # set by work that writes no markers (Ray Train workers)
        self._ctx = None
        self._t0 = 0.0

    def cached(self) -> StageResult | None:
        """The committed result of this identity (a no-op rerun), None if not committed yet."""
        m = self.out.committed()
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
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is not None and not isinstance(exc, OutputConflictError):
            try:  # a concurrent run of another identity committed here: that is the error to report
                self.out.committed()
            except OutputConflictError as conflict:
                self._ctx.__exit__(type(conflict), conflict, None)
                raise conflict from exc
            except Exception:  # noqa: BLE001 - the original error stays the one reported
                pass
        return bool(self._ctx.__exit__(exc_type, exc, tb))

    def commit(
        self,
        markers: Sequence[ShardMarker],
        *,
        counts: dict[str, int],
        figures: dict[str, float] | None = None,
        extra: dict[str, Any] | None = None,
        registered: dict[str, Any] | None = None,
        step: int | None = None,
    ) -> StageResult:
        """Log the counts (``<stage>/<name>``), the seconds and the figures (``val/psnr`` as it is,
        ``images_per_s`` as ``<stage>/images_per_s``) at ``step``, then commit."""
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
            extra=extra,
            nodes=self.nodes,
        )
        log.info("%s: committed %s in %.1f s %s", self.stage, manifest.output_uri, self.seconds, counts)
        return StageResult.of(manifest, cached=not ours)
