"""Our outputs are datasets to the ecosystem as they are: Hugging Face ``datasets``, pyarrow and pandas
read an ingest output and a generated one (images, class names, splits) from the folder or through
``infra.hf_datasets``; and ingest takes a dataset ``datasets`` wrote as a source."""

from __future__ import annotations

import datasets
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from infra import hf_datasets, image_shards, stage
from stages import ingest, sample
from stages.sample import SampleConfig
from tests import images
from tests.codes import tokenizer_file
from tests.generators import generator_file

EXP = "test-datasets"


@pytest.fixture(scope="module")
def ingested(stack, tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    files = {
        f"{split}/{c}/{i}.png": images.encode(images.noise(12, 12, "L", 10 * i + len(c)), "PNG")
        for split, n in (("train", 6), ("test", 3))
        for c in ("boot", "coat")
        for i in range(n)
    }
    images.write_tree(root / "src", files)
    cfg = ingest.IngestConfig(
        source_uri=str(root / "src"), output_uri=str(root / "images"), resolution=8, channels=1
    )
    return ingest.run(cfg, EXP).output_uri


def test_an_ingest_output_is_a_dataset(ingested, tmp_path):
    ds = hf_datasets.load(ingested, cache_dir=str(tmp_path / "hf"))
    assert set(ds) == {"train", "test"} and (ds["train"].num_rows, ds["test"].num_rows) == (12, 6)
    train = ds["train"]
    assert train.features["label"].names == ["boot", "coat"]
    assert isinstance(train.features["image"], datasets.Image)
    first = train[0]
    assert isinstance(first["image"], Image.Image) and first["image"].size == (8, 8)
    assert train.features["label"].int2str(first["label"]) in ("boot", "coat")
    # the folder alone, as datasets, pyarrow and pandas find it: the same rows and splits
    folder = datasets.load_dataset("parquet", data_dir=ingested, cache_dir=str(tmp_path / "hf2"))
    assert {k: v.num_rows for k, v in folder.items()} == {"train": 12, "test": 6}
    assert folder["test"].features["label"].names == ["boot", "coat"]
    assert pq.read_table(ingested).num_rows == 18 and len(pd.read_parquet(ingested)) == 18
    want = stage.read_committed_table(ingested, ["image_id"], "train")["image_id"].to_pylist()
    assert train["image_id"] == want  # the committed rows, in order


def test_a_generated_output_is_a_dataset(stack, tmp_path):
    """Demo-shaped: a class-conditional generator's 1-channel samples, with the class names."""
    tok = tokenizer_file(tmp_path, 16)
    gen, _ = generator_file(tmp_path / "gen.safetensors", tok)
    res = sample.run(
        SampleConfig(
            model_uri=gen, output_uri=str(tmp_path / "samples"), samples_per_class=2, samples_per_shard=4
        ),
        EXP,
    )
    ds = hf_datasets.load(res.output_uri, split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == 6 and ds.features["label"].names == ["class0", "class1", "class2"]
    assert [ds.features["label"].int2str(v) for v in ds["label"]] == ["class0", "class1", "class2"] * 2
    im = ds[0]["image"]
    assert isinstance(im, Image.Image) and im.mode == "L" and im.size == (16, 16)
    assert len(ds[0]["codes"]) == 2 * 64  # the sampled codes ride along
    folder = datasets.load_dataset("parquet", data_dir=res.output_uri, cache_dir=str(tmp_path / "hf2"))
    assert folder["train"].num_rows == 6 and len(pd.read_parquet(res.output_uri)) == 6


def test_ingest_reads_a_dataset_written_by_datasets(stack, tmp_path):
    """A Hub-style folder of ``train-*`` / ``test-*`` Parquet files with an Image column and a
    ClassLabel: the images, labels, names and splits come through."""
    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=["cat", "dog"]))
    rng = np.random.default_rng(0)
    src = tmp_path / "hub" / "data"
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "README.md").write_text("---\nlicense: mit\n---\n")  # a Hub dataset card beside it
    for split, n in (("train", 5), ("test", 3)):
        pics = [Image.fromarray(rng.integers(0, 255, (10, 14, 3), np.uint8)) for _ in range(n)]
        ds = datasets.Dataset.from_dict(
            {"image": pics, "label": [i % 2 for i in range(n)]}, features=features
        )
        ds.to_parquet(str(src / f"{split}-00000-of-00001.parquet"))
    res = ingest.run(
        ingest.IngestConfig(source_uri=str(tmp_path / "hub"), output_uri=str(tmp_path / "out"), resolution=8),
        EXP,
    )
    assert (res.counts["written"], res.counts["rejected"]) == (8, 0)
    assert image_shards.describe(res.manifest).label_names == ["cat", "dog"]
    t = stage.read_committed_table(res.output_uri, ["label", "split"])
    assert sorted(zip(t["split"].to_pylist(), t["label"].to_pylist())) == sorted(
        [("train", i % 2) for i in range(5)] + [("test", i % 2) for i in range(3)]
    )
