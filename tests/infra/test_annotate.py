"""The annotate worker's per-image failure handling, without Ray (the stages run it in actors)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
from PIL import Image

from infra import schemas, stage, storage
from infra.annotate import AnnotatePlan, AnnotateWorker
from infra.image_shards import Annotation, ImageShards
from tests import images

DATASET = ImageShards(channels=3, size=(8, 8), label_names=None)


class BrightnessDepth(AnnotateWorker):
    """A stand-in depth model: the mean brightness everywhere; refuses images whose first pixel is
    very dark (a stand-in failure)."""

    def __init__(self, out: stage.StageOutput, p: AnnotatePlan):
        super().__init__(out, p)
        self.batch_size = 3

    def annotate(self, x: np.ndarray) -> dict[str, list]:
        if (x[:, 0, 0, 0] < -0.9).any():
            raise ValueError("too dark for this model")
        mean = x.mean(axis=(1, 2, 3))
        maps = [np.full((8, 8), m, "<f2").tobytes() for m in mean]
        return {"depth": maps, "depth_min": mean.tolist(), "depth_max": mean.tolist()}


def test_failing_images_are_recorded_and_counts_add_up(tmp_path):
    rows = []
    for i in range(7):
        arr = np.full((8, 8, 3), 200, np.uint8)
        if i in (2, 5):
            arr[0, 0] = 0  # these two fail
        rows.append(
            {
                "image_id": f"id{i}",
                "image": {"bytes": images.encode(Image.fromarray(arr), "PNG"), "path": None},
                "label": None,
                "split": "train",
                "source_uri": f"src/{i}.png",
                "source_width": 8,
                "source_height": 8,
            }
        )
    src = tmp_path / "in.parquet"
    table = pa.Table.from_pylist(rows, DATASET.schema())
    entry = storage.write_parquet(str(src), table, rel_to=str(tmp_path))
    annotated = DATASET.annotated("depth", Annotation(model="test", weights_sha256="0", encoding="f16"))
    p = AnnotatePlan("depth", "depth", (), None, (entry,), 7, "", annotated)
    out = stage.StageOutput(str(tmp_path / "out"), "depth", "h")
    marker = BrightnessDepth(out, p).process(0, {"uri": str(src), "entry": dataclasses.asdict(entry)})
    assert marker.counts["read"] == 7 and marker.rows == 5 and marker.rejected == 2
    data = storage.read_parquet(out.file_uri(marker.data[0]))
    errors = storage.read_parquet(out.file_uri(marker.errors))
    assert data["image_id"].to_pylist() == ["id0", "id1", "id3", "id4", "id6"]  # input order kept
    assert errors["source_uri"].to_pylist() == ["src/2.png", "src/5.png"]
    assert all("too dark" in r for r in errors["reason"].to_pylist())
    assert data.schema.equals(annotated.schema(), check_metadata=True)  # the new descriptor, in the footer
    assert schemas.image_bytes(data["image"])[0] == rows[0]["image"]["bytes"]
