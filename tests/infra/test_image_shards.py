"""The dataset descriptors (image shards, generated image shards, code shards): one writer, one
reader each, and the Hugging Face features every data file carries."""

from __future__ import annotations

import datasets
import pyarrow as pa
import pytest

from infra import code_shards, image_shards, schemas, stage
from infra.code_shards import CodeShards, ConditionCodes
from infra.image_shards import Annotation, GeneratedImageShards, Generation, ImageShards
from models.sampling import SamplerOptions

IMAGES = ImageShards(channels=1, size=(32, 32), label_names=["a", "b"])
DEPTH = Annotation(model="midas_v21_small_256", weights_sha256="f" * 64, encoding="float16-le")
GENERATION = Generation(
    generator_uri="models:/g@candidate",
    pinned_uri="models:/g/3",
    generator_sha256="a" * 64,
    generator_format="native",
    registry_name="g",
    registry_version=3,
    training_run_id="run",
    condition="class",
    tokenizer_uri="/tok.safetensors",
    tokenizer_sha256="b" * 64,
    grid=(8, 8),
    codebook_size=512,
    sampler=SamplerOptions(top_k=100, cfg_scale=2.0),
    seed=0,
    tile=8,
    label_counts={"0": 2, "1": 2},
)
GENERATED = GeneratedImageShards(channels=1, size=(32, 32), label_names=["a", "b"], generation=GENERATION)
CODES = CodeShards(
    codebook_size=512,
    grid=(8, 8),
    tokenizer_uri="/tok.safetensors",
    tokenizer_sha256="b" * 64,
    label_names=["a", "b"],
    augmentations=["identity", "hflip"],
    crop_size=None,
    image_size=(32, 32),
    conditions={
        "depth_codes": ConditionCodes(codebook_size=64, grid=(4, 4), tokenizer_uri="/d", tokenizer_sha256="c")
    },
)


def _commit(uri: str, stage_name: str, dataset) -> stage.Manifest:
    m, _ = stage.StageOutput(uri, stage_name, f"id-{stage_name}").commit(
        config={}, config_hash="h", inputs=[], markers=[], counts={}, dataset=dataset.to_json()
    )
    return m


@pytest.mark.parametrize(
    "descriptor", [IMAGES, IMAGES.annotated("depth", DEPTH), GENERATED], ids=["ingest", "depth", "generated"]
)
def test_one_writer_one_reader(tmp_path, descriptor):
    """What a stage writes into its manifest is what describe() reads back, typed, whole."""
    m = _commit(str(tmp_path / "out"), "any", descriptor)
    back = image_shards.describe(str(tmp_path / "out"))
    assert back == descriptor and type(back) is type(descriptor)
    assert image_shards.describe(m) == descriptor
    with pytest.raises(stage.InputError, match="not code shards"):
        code_shards.describe(m)


def test_code_shards_round_trip_and_wrong_kind(tmp_path):
    m = _commit(str(tmp_path / "codes"), "tokenize_images", CODES)
    back = code_shards.describe(m)
    assert back == CODES and back.conditions["depth_codes"].length == 16 and back.num_tokens == 64
    with pytest.raises(stage.InputError, match="not image shards"):
        image_shards.describe(m)
    bad = dict(CODES.to_json(), codebook_size="many")  # a descriptor that does not fit its type
    m.dataset = bad
    with pytest.raises(stage.InputError, match="dataset.codebook_size: expected an integer"):
        code_shards.describe(m)


@pytest.mark.parametrize(
    "descriptor",
    [IMAGES.annotated("depth", DEPTH), GENERATED, CODES],
    ids=["annotated", "generated", "codes"],
)
def test_the_schema_carries_the_features_datasets_reads(descriptor):
    """The features we write are the ones ``datasets`` derives for our Arrow types: an Image for
    ``image``, a ClassLabel with the names for ``label``, plain values elsewhere; so it reads the
    columns as they are (no cast), and the descriptor rides along."""
    schema = descriptor.schema()
    features = datasets.Features.from_arrow_schema(schema)
    assert features.arrow_schema == pa.schema([f.with_nullable(True) for f in schema])
    assert features["label"] == datasets.ClassLabel(names=["a", "b"])
    if "image" in schema.names:
        assert features["image"] == datasets.Image()
    assert schemas.descriptor_json(descriptor) == descriptor.to_json()
    import json

    assert json.loads(schema.metadata[schemas.DESCRIPTOR_KEY.encode()]) == descriptor.to_json()


def test_image_bytes_of_the_image_column():
    col = schemas.image_column([b"png0", b"png1"])
    assert col.type == schemas.IMAGE_TYPE and schemas.image_bytes(col) == [b"png0", b"png1"]
    assert schemas.image_bytes(pa.chunked_array([col])) == [b"png0", b"png1"]


def test_rows_by_id_reads_only_the_files_that_hold_them(tmp_path):
    """Rows in the asked order, repeats kept, an unknown id named; only the files holding the ids
    are read whole (and verified): a damaged other file is not, while asking a row of it fails."""
    uri = str(tmp_path / "images")
    out = stage.StageOutput(uri, "ingest", "id-ingest")

    def shard(i: int, ids: list[str]):
        t = pa.table({"image_id": ids, "image": [f"png-{v}".encode() for v in ids], "label": [i] * len(ids)})
        return out.write_shard(i, t, {})

    m, _ = out.commit(
        config={},
        config_hash="h",
        inputs=[],
        markers=[shard(0, ["a", "b"]), shard(1, ["c", "d", "e"])],
        counts={},
        dataset=IMAGES.to_json(),
    )
    t = image_shards.rows_by_id(uri, ["d", "a", "d"], ["image"])
    assert t["image_id"].to_pylist() == ["d", "a", "d"]
    assert t["image"].to_pylist() == [b"png-d", b"png-a", b"png-d"]
    with pytest.raises(stage.InputError, match="holds no image z"):
        image_shards.rows_by_id(uri, ["a", "z"], ["image"])
    # the second file damaged in a column the lookup does not read (same size, other bytes)
    path = m.data_uris()[1]
    data = bytearray(open(path, "rb").read())
    at = data.find(b"png-e")
    assert at > 0
    data[at : at + 5] = b"PNG-E"
    open(path, "wb").write(bytes(data))
    assert image_shards.rows_by_id(uri, ["b"], ["label"])["label"].to_pylist() == [0]
    with pytest.raises(stage.InputError):
        image_shards.rows_by_id(uri, ["c"], ["image"])
