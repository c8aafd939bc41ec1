"""The annotate worker's per-image failure handling, without Ray (the stages run it in actors)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from infra import stage, storage
from stages.annotate import AnnotateWorker
from tests import images


class BrightnessWorker(AnnotateWorker):
    """Annotates the mean brightness; refuses images whose first pixel is very dark (a stand-in failure)."""

    def __init__(self, out: stage.StageOutput):
        self.out, self.metadata, self.batch_size = out, {"taming.test": "1"}, 3

    def fields(self):
        return [pa.field("brightness", pa.float32())]

    def annotate(self, x: np.ndarray) -> dict[str, list]:
        if (x[:, 0, 0, 0] < -0.9).any():
            raise ValueError("too dark for this model")
        return {"brightness": x.mean(axis=(1, 2, 3)).tolist()}


def test_failing_images_are_recorded_and_counts_add_up(tmp_path):
    rows = []
    for i in range(7):
        arr = np.full((8, 8, 3), 200, np.uint8)
        if i in (2, 5):
            arr[0, 0] = 0  # these two fail
        from PIL import Image

        rows.append(
            {
                "image_id": f"id{i}",
                "image": images.encode(Image.fromarray(arr), "PNG"),
                "label": None,
                "split": "train",
                "source_uri": f"src/{i}.png",
                "width": 8,
                "height": 8,
            }
        )
    src = tmp_path / "in.parquet"
    storage.write_parquet(str(src), pa.Table.from_pylist(rows), rel_to=str(tmp_path))
    out = stage.StageOutput(str(tmp_path / "out"), "test", "h")
    marker = BrightnessWorker(out).process(0, {"uri": str(src)})
    assert marker.counts["read"] == 7
    assert marker.rows("data") == 5 and marker.rows("_errors") == 2
    data = storage.read_parquet(storage.join(out.output_uri, marker.files["data"].path))
    errors = storage.read_parquet(storage.join(out.output_uri, marker.files["_errors"].path))
    assert data["image_id"].to_pylist() == ["id0", "id1", "id3", "id4", "id6"]  # input order kept
    assert errors["source_uri"].to_pylist() == ["src/2.png", "src/5.png"]
    assert all("too dark" in r for r in errors["reason"].to_pylist())
    assert data.schema.metadata[b"taming.test"] == b"1"
