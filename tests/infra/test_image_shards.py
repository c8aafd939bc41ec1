"""infra.image_shards: what an image-shard output holds, through its lineage."""

from __future__ import annotations

from infra import image_shards
from infra.stage import InputRef, StageOutput


def _commit(uri: str, stage: str, *, config=None, extra=None, inputs=()):
    m, _ = StageOutput(uri, stage, f"id-{stage}").commit(
        config=config or {},
        config_hash="h",
        inputs=list(inputs),
        markers=[],
        counts={},
        extra=extra or {},
    )
    return m


def test_channels_resolution_and_names_come_through_the_lineage(tmp_path):
    ing = _commit(
        str(tmp_path / "images"),
        "ingest",
        config={"channels": 3, "resolution": 64},
        extra={"channels": 1, "resolution": 32, "label_names": ["a", "b"]},
    )
    # a stage that adds a column (depth) records none of them: its images' values hold
    dep = _commit(str(tmp_path / "depth"), "depth", inputs=[InputRef.output("images", ing)])
    want = {"channels": 1, "resolution": 32, "label_names": ["a", "b"]}
    assert image_shards.info(dep) == want and image_shards.info(str(tmp_path / "depth")) == want
    # an ingest output committed before extra carried them: its config
    old = _commit(str(tmp_path / "old"), "ingest", config={"channels": 3, "resolution": 16})
    assert image_shards.info(old) == {"channels": 3, "resolution": 16, "label_names": None}
