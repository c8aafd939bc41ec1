"""Export of committed image shards as an ImageFolder tree and WebDataset tars: what torchvision and
webdataset read back is what the shards hold, counted per class; nothing half-written is visible."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from infra import image_shards, schemas, stage, storage
from infra.image_shards import ImageShards
from pipelines import export

NAMES = ["T-shirt/top", "Trouser", "a:b"]


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), i * 7 % 256, np.uint8), "L").save(buf, "PNG")
    return buf.getvalue()


def _images(uri: str, n: int = 9, splits=("train", "test")) -> stage.Manifest:
    d = ImageShards(channels=1, size=(8, 8), label_names=NAMES)
    out = stage.StageOutput(uri, "ingest", f"export-test-{n}")
    markers = []
    for shard, rows in enumerate(np.array_split(np.arange(n), 2)):
        t = pa.table(
            {
                "image_id": [f"id{i:03d}" for i in rows],
                "image": schemas.image_column([_png(i) for i in rows]),
                "label": [int(i % 3) for i in rows],
                "split": [splits[i % len(splits)] for i in rows],
                "source_uri": [f"file:///src/{i}.png" for i in rows],
                "source_width": [8] * len(rows),
                "source_height": [8] * len(rows),
            },
            schema=d.schema(),
        )
        markers.append(out.write_shard(shard, t, {"read": len(rows)}))
    m, _ = out.commit(
        config={}, config_hash="h", inputs=[], markers=markers, counts={"images": n}, dataset=d.to_json()
    )
    return m


def test_safe_names_and_collisions():
    assert export.safe_name("T-shirt/top") == "T-shirt_top"
    assert export.safe_name("..") == "_" and export.safe_name("a\\b:c") == "a_b_c"
    dirs = export.class_dirs(["x/y", "x:y", "z"], {0, 1, 2, None})
    assert dirs == {0: "x_y_0", 1: "x_y_1", 2: "z", None: "unlabelled"}


def test_imagefolder_round_trip(tmp_path):
    from torchvision.datasets import ImageFolder

    m = _images(str(tmp_path / "images"))
    dest = tmp_path / "out"
    record = export.export(m.output_uri, str(dest))
    assert record["images"] == 9 and record["counts"] == {
        "test": {"0": 1, "1": 2, "2": 1},
        "train": {"0": 2, "1": 1, "2": 2},
    }
    train = ImageFolder(str(dest / "train"))
    assert train.classes == ["T-shirt_top", "Trouser", "a_b"] and len(train) == 5
    # every PNG is the shard's own bytes, in its class folder
    t = stage.read_committed_table(m.output_uri)
    for iid, lab, sp, png in zip(
        t["image_id"].to_pylist(),
        t["label"].to_pylist(),
        t["split"].to_pylist(),
        schemas.image_bytes(t["image"]),
    ):
        folder = export.class_dirs(NAMES, {0, 1, 2})[lab]
        assert (dest / sp / folder / f"{iid}.png").read_bytes() == png
    assert json.loads((dest / "export.json").read_text())["identity"] == m.identity
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export-")]  # nothing left over

    # the same export again: a no-op; another one into the same place: refused, nothing touched
    assert export.export(m.output_uri, str(dest)) == record
    with pytest.raises(stage.InputError, match="exists and is not this export"):
        export.export(m.output_uri, str(dest), "webdataset")
    one = export.export(m.output_uri, str(tmp_path / "test-only"), split="test")
    assert sorted(p.name for p in (tmp_path / "test-only").iterdir()) == [
        "T-shirt_top",
        "Trouser",
        "a_b",
        "export.json",
    ]
    assert one["images"] == 4
    with pytest.raises(stage.InputError, match="has no split 'val'"):
        export.export(m.output_uri, str(tmp_path / "v"), split="val")


def test_webdataset_round_trip(tmp_path):
    import webdataset as wds

    m = _images(str(tmp_path / "images"), n=7, splits=("train",))
    dest = tmp_path / "wds"
    export.export(m.output_uri, str(dest), "webdataset", shard_size=3)
    tars = sorted(p.name for p in dest.glob("*.tar"))
    assert tars == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    got = list(wds.WebDataset([str(dest / n) for n in tars], shardshuffle=False))
    t = stage.read_committed_table(m.output_uri)
    want = dict(zip(t["image_id"].to_pylist(), zip(schemas.image_bytes(t["image"]), t["label"].to_pylist())))
    assert len(got) == 7
    for s in got:
        meta = json.loads(s["json"])
        png, label = want[meta["image_id"]]
        assert s["png"] == png and int(s["cls"]) == label and meta["label_name"] == NAMES[label]


def test_an_uncommitted_or_damaged_source_fails_in_one_line(tmp_path):
    with pytest.raises(stage.NotCommittedError):
        export.export(str(tmp_path / "nothing"), str(tmp_path / "out"))
    m = _images(str(tmp_path / "images"))
    victim = m.data_uris()[0]
    storage.write_bytes(victim, storage.read_bytes(victim)[:-10])
    with pytest.raises(stage.InputError):
        export.export(m.output_uri, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit, match="error: "):
        export.main([m.output_uri, str(tmp_path / "out")])
    assert image_shards.describe(m).label_names == NAMES


def test_from_and_to_s3(s3_bucket, tmp_path):
    """Shards on S3 exported to S3: the files, then export.json last, the PNGs the shards' own."""
    m = _images(f"{s3_bucket}/images", n=5, splits=("train",))
    dest = f"{s3_bucket}/export"
    record = export.export(m.output_uri, dest)
    assert record["images"] == 5
    fs, path = storage.filesystem(dest)
    pngs = sorted(p for p in fs.find(path) if p.endswith(".png"))
    assert len(pngs) == 5 and storage.read_json(f"{dest}/export.json")["identity"] == m.identity
    t = stage.read_committed_table(m.output_uri)
    first = t["image_id"][0].as_py()
    folder = export.class_dirs(NAMES, {0, 1, 2})[t["label"][0].as_py()]
    assert storage.read_bytes(f"{dest}/{folder}/{first}.png") == schemas.image_bytes(t["image"])[0]
    assert export.export(m.output_uri, dest) == record  # again: a no-op
