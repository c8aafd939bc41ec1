"""The stage contract on local paths and on s3:// (moto server): commit, skip, conflict, atomicity."""

from __future__ import annotations

import pyarrow as pa
import pytest

from infra import io


@pytest.fixture(params=["local", "s3"])
def base_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path)
    return request.getfixturevalue("s3_bucket")


def _table(n: int, start: int = 0) -> pa.Table:
    return pa.table({"x": list(range(start, start + n))})


def test_commit_skip_conflict(base_uri):
    uri = io.join(base_uri, "out")
    out = io.StageOutput(uri, "demo", "hash-a")
    assert out.committed() is None
    with pytest.raises(io.NotCommittedError, match="no committed stage output"):
        io.read_manifest(uri)
    m0 = out.write_shard(0, {"data": _table(3)}, {"read": 3})
    m1 = out.write_shard(1, {"data": _table(2, 3)}, {"read": 2})
    # shard files exist, but nothing is committed yet
    with pytest.raises(io.NotCommittedError):
        io.read_committed_table(uri)
    assert sorted(out.done_shards()) == [0, 1]
    manifest = out.commit(
        config={"k": 1}, input_uris=["in"], markers=[m1, m0], counts={"read": 5}, mlflow_run_id="r1"
    )
    assert [f.rows for f in manifest.files] == [3, 2]
    assert io.read_committed_table(uri, verify=True).column("x").to_pylist() == [0, 1, 2, 3, 4]

    # the same config again: the recorded result, nothing rewritten
    again = io.StageOutput(uri, "demo", "hash-a").committed()
    assert again is not None and again.mlflow_run_id == "r1" and again.created_at == manifest.created_at
    # a different config at the same location: refused
    with pytest.raises(io.OutputConflictError, match="different config"):
        io.StageOutput(uri, "demo", "hash-b").committed()


def test_commit_removes_abandoned_attempts(base_uri):
    uri = io.join(base_uri, "out2")
    stale = io.StageOutput(uri, "demo", "old")
    stale.write_shard(0, {"data": _table(1)}, {})
    out = io.StageOutput(uri, "demo", "new")
    m = out.write_shard(0, {"data": _table(2)}, {})
    out.commit(config={}, input_uris=[], markers=[m], counts={}, mlflow_run_id=None)
    assert not io.exists(stale.work_uri)
    assert io.read_committed_table(uri).num_rows == 2


def test_verify_detects_changed_file(tmp_path):
    out = io.StageOutput(str(tmp_path), "demo", "h")
    m = out.write_shard(0, {"data": _table(4)}, {})
    manifest = out.commit(config={}, input_uris=[], markers=[m], counts={}, mlflow_run_id=None)
    io.write_parquet(manifest.data_uris()[0], _table(4, 100), rel_to=str(tmp_path))
    with pytest.raises(OSError, match="sha256"):
        io.read_committed_table(str(tmp_path), verify=True)


def test_atomic_local_write_leaves_no_partial(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    io.write_bytes(str(target), b"old")

    def broken_replace(src, dst):
        raise OSError("disk died")

    monkeypatch.setattr(io.os, "replace", broken_replace)
    with pytest.raises(OSError):
        io.write_bytes(str(target), b"new content")
    assert target.read_bytes() == b"old"


def test_list_files_local_and_join(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "x.txt").write_text("1")
    (tmp_path / "y.txt").write_text("2")
    assert io.list_files(str(tmp_path)) == [str(tmp_path / "a/b/x.txt"), str(tmp_path / "y.txt")]
    assert io.join("s3://b/", "/c/", "d") == "s3://b/c/d"
    assert io.normalize("s3://b/c/") == "s3://b/c"
