"""Models from S3 and the registry are cached by content: a changed object or a moved alias is
fetched again, and a download that died half-way is never used."""

from __future__ import annotations

import mlflow
import pytest
import torch

from infra import model_store, storage
from models import checkpoint
from models.vqgan import VQGAN
from tests.tiny import tiny_vqgan


def _model_bytes(seed: int) -> bytes:
    torch.manual_seed(seed)
    return checkpoint.to_bytes(VQGAN(tiny_vqgan()))


def test_s3_object_changed_is_fetched_again(s3_bucket):
    uri = f"{s3_bucket}/models/tok.safetensors"
    a, b = _model_bytes(0), _model_bytes(1)
    storage.write_bytes(uri, a)
    assert model_store.load(uri).sha256 == storage.sha256(a)
    storage.write_bytes(uri, b)  # same URI, new content
    assert model_store.load(uri).sha256 == storage.sha256(b)
    assert model_store.load(uri).sha256 == storage.sha256(b)  # cached now, still the right one


def test_half_download_is_never_used(s3_bucket, monkeypatch):
    uri = f"{s3_bucket}/models/half.safetensors"
    data = _model_bytes(2)
    storage.write_bytes(uri, data)
    fs, _ = storage.filesystem(uri)

    def dies_half_way(rpath, lpath, **kwargs):
        with open(lpath, "wb") as f:
            f.write(data[: len(data) // 2])
        raise ConnectionError("connection reset while downloading")

    with monkeypatch.context() as m:
        m.setattr(fs, "get_file", dies_half_way)  # fsspec caches the instance: the one the store uses
        with pytest.raises(ConnectionError):
            model_store.load(uri)
    loaded = model_store.load(uri)
    assert loaded.sha256 == storage.sha256(data)
    leftovers = [p.name for p in (model_store.tracking.local_dir() / "model-cache").iterdir()]
    assert not [n for n in leftovers if n.startswith(".tmp-")]  # the partial copy was cleaned up


def test_moved_alias_loads_the_new_version(stack):
    mlflow.set_tracking_uri(stack["mlflow"].uri)
    mlflow.set_experiment("test-model-store")
    with mlflow.start_run():
        first = model_store.register(_model_bytes(3), "test-moving-alias", alias="candidate")
    assert model_store.load("models:/test-moving-alias@candidate").sha256 == storage.sha256(_model_bytes(3))
    with mlflow.start_run():
        second = model_store.register(_model_bytes(4), "test-moving-alias", alias="candidate")
    assert second["version"] == first["version"] + 1
    assert model_store.load("models:/test-moving-alias@candidate").sha256 == storage.sha256(_model_bytes(4))
    pinned = f"models:/test-moving-alias/{first['version']}"
    assert model_store.load(pinned).sha256 == storage.sha256(_model_bytes(3))


def test_a_header_is_read_without_the_weights_and_checked_on_load(tmp_path):
    """describe() reads kind, config and sha256 from the file's header (what a plan checks);
    load() with that sha256 refuses weights that changed since."""
    from infra.stage import InputError

    path = tmp_path / "tok.safetensors"
    path.write_bytes(_model_bytes(5))
    header = model_store.describe(str(path))
    assert (header.kind, header.format, header.config) == ("vqgan", "native", tiny_vqgan())
    assert header.sha256 == storage.sha256(_model_bytes(5))
    assert model_store.load(str(path), header.sha256).sha256 == header.sha256
    path.write_bytes(_model_bytes(6))
    with pytest.raises(InputError, match="it changed since"):
        model_store.load(str(path), header.sha256)


def test_formats_are_declared_never_guessed(tmp_path):
    """A folder that is not a taming release is refused, not searched for some checkpoint inside."""
    from infra.stage import InputError

    (tmp_path / "models" / "deep").mkdir(parents=True)
    (tmp_path / "models" / "deep" / "tok.safetensors").write_bytes(_model_bytes(7))
    with pytest.raises(FileNotFoundError, match="checkpoints/last.ckpt"):
        model_store.describe(str(tmp_path / "models"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(InputError, match="not a model format"):
        model_store.describe(str(tmp_path / "weights.bin"))


def test_registered_model_is_read_through_its_mlmodel(stack):
    mlflow.set_tracking_uri(stack["mlflow"].uri)
    mlflow.set_experiment("test-model-store")
    with mlflow.start_run():
        model_store.register(_model_bytes(8), "test-header", alias="candidate")
    header = model_store.describe("models:/test-header@candidate")
    assert header.kind == "vqgan" and header.sha256 == storage.sha256(_model_bytes(8))
    assert header.path.name == "test-header.safetensors" and header.path.parent.name == "artifacts"


def test_the_generator_version_of_samples_from_a_registered_output(tmp_path):
    """Samples of a pipeline's train_gpt output (a path, not models:/) name the version that output
    registered, so the registry gate can judge them; an unregistered output names none."""
    import dataclasses

    from infra.stage import StageOutput
    from tests.stages.test_evaluate import GENERATION

    def committed(name: str, registered):
        out = StageOutput(str(tmp_path / name), "train_gpt", f"id-{name}")
        marker = out.write_file(0, "model.bin", b"weights")
        out.commit(config={}, config_hash="x", inputs=[], markers=[marker], counts={}, registered=registered)
        return out.output_uri

    reg = committed("gpt", {"name": "demo-gpt", "version": 3, "uri": "models:/demo-gpt/3"})
    gen = dataclasses.replace(GENERATION, pinned_uri=reg, generator_uri=reg)
    assert model_store.generator_version(gen) == ("demo-gpt", 3)
    assert model_store.pin(reg)[1:3] == ("demo-gpt", 3)
    plain = committed("plain", None)
    assert model_store.generator_version(dataclasses.replace(gen, pinned_uri=plain)) is None
    recorded = dataclasses.replace(gen, registry_name="other", registry_version=7)
    assert model_store.generator_version(recorded) == ("other", 7)
