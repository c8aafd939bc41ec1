"""The stage contract on local paths and on s3:// (moto server): commit, skip, conflict, atomicity,
conditional commits of concurrent runs, the layout folder readers see, and the one identity rule."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pytest

from infra import config as C
from infra import lease, stage, storage
from infra.config import execution_field, input_field, output_field
from infra.stage import InputRef


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.services)])
def base_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path)
    return request.getfixturevalue("s3_bucket")


def _table(n: int, start: int = 0, split: str | None = None) -> pa.Table:
    t = pa.table({"x": list(range(start, start + n))})
    return t if split is None else t.append_column("split", pa.array([split] * n))


def _commit(out: stage.StageOutput, markers, run_id=None):
    return out.commit(config={}, config_hash="c", inputs=[], markers=markers, counts={}, mlflow_run_id=run_id)


def test_commit_skip_conflict(base_uri):
    uri = storage.join(base_uri, "out")
    out = stage.StageOutput(uri, "demo", "hash-a")
    assert out.committed() is None
    with pytest.raises(stage.NotCommittedError, match="no committed stage output"):
        stage.read_manifest(uri)
    m0 = out.write_shard(0, _table(3), {"read": 3})
    m1 = out.write_shard(1, _table(2, 3), {"read": 2})
    # shard files exist, but nothing is committed yet
    with pytest.raises(stage.NotCommittedError):
        stage.read_committed_table(uri)
    assert sorted(out.done_shards()) == [0, 1] and out.done_shards()[1] == m1  # typed markers round-trip
    inputs = [InputRef.source("source", "in", "d1")]
    manifest, ours = out.commit(
        config={"k": 1},
        config_hash="c",
        inputs=inputs,
        markers=[m1, m0],
        counts={"read": 5},
        mlflow_run_id="r1",
    )
    assert ours and [f.rows for f in manifest.files] == [3, 2]
    assert stage.read_committed_table(uri, verify=True).column("x").to_pylist() == [0, 1, 2, 3, 4]
    assert stage.read_manifest(uri).inputs == inputs  # the lineage is recorded

    # the same identity again: the recorded result, nothing rewritten
    again = stage.StageOutput(uri, "demo", "hash-a").committed()
    assert again is not None and again.mlflow_run_id == "r1" and again.created_at == manifest.created_at
    # a different identity at the same location: refused
    with pytest.raises(stage.OutputConflictError, match="different config"):
        stage.StageOutput(uri, "demo", "hash-b").committed()


def test_commit_removes_abandoned_attempts(base_uri):
    uri = storage.join(base_uri, "out2")
    stale = stage.StageOutput(uri, "demo", "old")
    stale.write_shard(0, _table(1), {})
    out = stage.StageOutput(uri, "demo", "new")
    _commit(out, [out.write_shard(0, _table(2), {})])
    assert not storage.exists(stale.work_uri) and not storage.exists(out.work_uri)
    assert stage.read_committed_table(uri).num_rows == 2


def test_commit_is_conditional(base_uri):
    """The last writer does not win: a commit over an existing manifest of another identity fails
    and changes nothing; one of the same identity returns the first commit."""
    uri = storage.join(base_uri, "out3")
    a, b = stage.StageOutput(uri, "demo", "a"), stage.StageOutput(uri, "demo", "b")
    ma, mb = a.write_shard(0, _table(1), {}), b.write_shard(0, _table(5), {})
    assert b.committed() is None and a.committed() is None  # both checked before either committed
    first, ours = _commit(a, [ma], "run-a")
    assert ours
    with pytest.raises(stage.OutputConflictError):
        _commit(b, [mb], "run-b")
    assert stage.read_manifest(uri).identity == "a" and stage.read_committed_table(uri).num_rows == 1
    winner, ours = _commit(stage.StageOutput(uri, "demo", "a"), [ma], "run-a2")
    assert not ours and winner.mlflow_run_id == "run-a" and winner.created_at == first.created_at


def test_a_commit_claimed_by_another_identity_is_a_conflict(base_uri, monkeypatch):
    """A run that stopped half-way through its commit (claimed, files published, no manifest) leaves
    the location to its own identity: another identity is refused before any work, the same one
    takes the claim over once its heartbeat is stale and finishes the commit."""
    uri = storage.join(base_uri, "claimed")
    a = stage.StageOutput(uri, "demo", "a")
    marker = a.write_shard(0, _table(3, split="train"), {})
    assert a.claim() is None
    a._publish(list(marker.data))  # ... and the process dies before the manifest
    a._claim._stop.set()  # its heartbeat stops with it
    with pytest.raises(stage.OutputConflictError, match="being committed by another run"):
        stage.StageOutput(uri, "demo", "b").committed()
    monkeypatch.setattr(lease, "STALE_S", 0.5)
    time.sleep(0.6)  # no heartbeat since: the claimant is gone
    manifest, ours = _commit(stage.StageOutput(uri, "demo", "a"), [marker])
    assert ours and stage.read_committed_table(uri).num_rows == 3
    assert not storage.exists(storage.join(uri, stage.CLAIM_NAME))


def test_concurrent_commits_one_wins(base_uri):
    """Eight threads commit eight identities to one URI at once: exactly one commits, seven get
    the conflict error, and the manifest is the winner's."""
    uri = storage.join(base_uri, "race")
    outs = [stage.StageOutput(uri, "demo", f"id{i}") for i in range(8)]
    markers = [o.write_shard(0, _table(i + 1), {}) for i, o in enumerate(outs)]
    start, results = threading.Barrier(len(outs)), {}

    def commit(i: int) -> None:
        start.wait()
        try:
            results[i] = _commit(outs[i], [markers[i]], f"run{i}")[0].identity
        except stage.OutputConflictError as e:
            results[i] = e

    threads = [threading.Thread(target=commit, args=(i,)) for i in range(len(outs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [i for i, r in results.items() if isinstance(r, str)]
    assert len(won) == 1 and sum(isinstance(r, stage.OutputConflictError) for r in results.values()) == 7
    assert stage.read_manifest(uri).identity == f"id{won[0]}"
    assert stage.read_committed_table(uri).num_rows == won[0] + 1


def test_folder_readers_see_exactly_the_committed_rows(base_uri):
    """pyarrow and pandas pointed at the output folder: nothing before the commit, the committed
    rows after it (files named for their split), none of an abandoned attempt's."""
    import pandas as pd
    import pyarrow.parquet as pq

    uri = storage.join(base_uri, "readers")
    fs, path = storage.filesystem(uri)

    def folder_rows() -> int:
        try:
            return pq.read_table(path, filesystem=fs).num_rows
        except (FileNotFoundError, OSError, pa.ArrowInvalid):  # an empty or missing folder
            return 0

    out = stage.StageOutput(uri, "demo", "a")
    mixed = pa.concat_tables(
        [_table(3, split="train"), _table(2, 3, split="test"), _table(1, 5, split="train")]
    )
    m0 = out.write_shard(0, mixed, {"read": 6})
    stage.StageOutput(uri, "demo", "stale").write_shard(0, _table(9, split="train"), {})
    assert folder_rows() == 0  # work in progress is invisible
    manifest, _ = _commit(out, [m0])
    assert [(f.path, f.split, f.rows) for f in manifest.files] == [
        ("data/train-00000.parquet", "train", 4),
        ("data/test-00000.parquet", "test", 2),
    ]
    assert folder_rows() == 6
    if not storage.is_remote(uri):
        assert len(pd.read_parquet(uri)) == 6
    train = stage.read_committed_table(uri, split="train")
    assert train["x"].to_pylist() == [0, 1, 2, 5]  # the rows of a split, in their order


def test_an_output_of_the_earlier_layout_is_refused(tmp_path):
    storage.write_json(str(tmp_path / stage.MANIFEST_NAME), {"stage": "ingest", "identity": "x"})
    with pytest.raises(stage.OutputConflictError, match="earlier version .* rebuild it"):
        stage.read_manifest(str(tmp_path))


def test_create_bytes_is_exclusive(base_uri):
    uri = storage.join(base_uri, "x.json")
    assert storage.create_bytes(uri, b"one") and not storage.create_bytes(uri, b"two")
    assert storage.read_bytes(uri) == b"one"


def test_verify_detects_changed_file(tmp_path):
    """A committed file that changed: refused on read, naming the file and both digests; by size
    alone where the size differs (a plan's check, before any work)."""
    out = stage.StageOutput(str(tmp_path), "demo", "h")
    manifest, _ = _commit(out, [out.write_shard(0, _table(4), {})])
    uri, entry = manifest.data_uris()[0], manifest.files[0]
    changed = bytearray(storage.read_bytes(uri))
    changed[len(changed) // 2] ^= 0xFF  # one flipped byte: the same size
    storage.write_bytes(uri, bytes(changed))
    manifest.check_sizes()  # sizes alone cannot see it
    with pytest.raises(stage.InputError, match=f"{uri} has sha256 .*, its manifest {entry.sha256}"):
        stage.read_committed_table(str(tmp_path))
    storage.write_bytes(uri, bytes(changed[:-10]))  # truncated
    with pytest.raises(
        stage.InputError, match=f"{uri} holds {len(changed) - 10} bytes, its manifest {entry.bytes}"
    ):
        manifest.check_sizes()


def test_a_manifest_names_no_path_outside_its_output(tmp_path):
    out = stage.StageOutput(str(tmp_path / "o"), "demo", "h")
    manifest, _ = _commit(out, [out.write_shard(0, _table(2), {})])
    data = manifest.to_json()
    data["files"][0]["path"] = "../../elsewhere/model.safetensors"
    storage.write_json(str(tmp_path / "o" / stage.MANIFEST_NAME), data)
    with pytest.raises(stage.InputError, match="a path outside the output folder"):
        stage.read_manifest(str(tmp_path / "o"))
    (tmp_path / "o" / stage.MANIFEST_NAME).write_text('{"stage": "demo", "identi')  # cut short
    with pytest.raises(stage.InputError, match="not a readable manifest"):
        stage.read_manifest(str(tmp_path / "o"))


def test_atomic_local_write_leaves_no_partial(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    storage.write_bytes(str(target), b"old")

    def broken_replace(src, dst):
        raise OSError("disk died")

    monkeypatch.setattr(storage.os, "replace", broken_replace)
    with pytest.raises(OSError):
        storage.write_bytes(str(target), b"new content")
    assert target.read_bytes() == b"old"


def test_list_files_local_and_join(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "x.txt").write_text("1")
    (tmp_path / "y.txt").write_text("2")
    assert storage.list_files(str(tmp_path)) == [str(tmp_path / "a/b/x.txt"), str(tmp_path / "y.txt")]
    assert storage.join("s3://b/", "/c/", "d") == "s3://b/c/d"
    assert storage.normalize("s3://b/c/") == "s3://b/c"


@dataclass(frozen=True)
class Inner:
    rate: float = 0.5
    workers: int = C.execution_field(1)


@dataclass(frozen=True)
class Cfg:
    images_uri: str = input_field()
    output_uri: str = output_field()
    size: int = 4
    batch: int = execution_field(8)
    inner: Inner = field(default_factory=Inner)


def test_identity_rule():
    """Config hash (role fields left out) + the inputs' digests by name: location never counts,
    content does."""
    img = InputRef("images", "/a", "d1", "output")
    base = stage.identity("s", Cfg(images_uri="/a", output_uri="/o"), [img])
    moved = InputRef("images", "/elsewhere", "d1", "output")
    same = [
        stage.identity("s", Cfg(images_uri="/elsewhere", output_uri="/p", batch=64), [moved]),
    ]
    assert all(s == base for s in same)
    different = [
        stage.identity("s", Cfg(size=5), [img]),  # a config field
        stage.identity("s", Cfg(), [InputRef("images", "/a", "d2", "output")]),  # the input's content
        stage.identity("t", Cfg(), [img]),  # another stage
        stage.identity("s", Cfg(), [img, InputRef.weights("w", "/w", "sha")]),  # one more input
        stage.identity("s", Cfg(inner=Inner(rate=0.6)), [img]),  # a nested config field
    ]
    assert stage.identity("s", Cfg(inner=Inner(workers=4)), [img]) == stage.identity("s", Cfg(), [img])
    assert base not in different and len(set(different)) == len(different)
