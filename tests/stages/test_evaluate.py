"""The evaluate stage: metrics that can fail, on image sets whose answer is known."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from infra import inception, model_store, schemas, stage, storage, tracking
from infra.config import ConfigError
from infra.image_shards import GeneratedImageShards, Generation, ImageShards
from infra.imaging import encode_png
from infra.stage import InputError, StageOutput
from models.evaluation import ClassifierRecipe
from models.sampling import SamplerOptions
from stages import evaluate
from stages.evaluate import EvaluateConfig

EXP = "test-evaluate"
GENERATION = Generation(
    generator_uri="models:/g@candidate",
    pinned_uri="models:/g/1",
    generator_sha256="0" * 64,
    generator_format="native",
    registry_name=None,
    registry_version=None,
    training_run_id=None,
    condition="class",
    tokenizer_uri=None,
    tokenizer_sha256="1" * 64,
    grid=(8, 8),
    codebook_size=16,
    sampler=SamplerOptions(),
    seed=0,
    tile=8,
)
CLASSES = 3
SIDE = 16


def patterns(labels: np.ndarray, seed: int, shift: int = 0) -> np.ndarray:
    """uint8 (N, SIDE, SIDE): class c is a bright bar in rows 5c..5c+4 over noise; ``shift`` adds
    brightness everywhere."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 60, (len(labels), SIDE, SIDE)).astype(np.int64)
    for i, c in enumerate(labels):
        x[i, 5 * c : 5 * c + 4] += 160
    return np.clip(x + shift, 0, 255).astype(np.uint8)


def image_set(uri: str, images: np.ndarray, labels, split, channels: int = 1, registry=None) -> str:
    """Commit ``images`` as image shards (ingest's columns and descriptor); ``registry``: (name,
    version) of a generator, making it a generated dataset with that lineage."""
    n = len(images)
    splits = [split] * n if isinstance(split, str) else list(split)
    names = [f"c{k}" for k in range(CLASSES)]
    dataset = ImageShards(channels=channels, size=(SIDE, SIDE), label_names=names)
    if registry is not None:
        generation = dataclasses.replace(GENERATION, registry_name=registry[0], registry_version=registry[1])
        dataset = GeneratedImageShards(
            channels=channels, size=(SIDE, SIDE), label_names=names, generation=generation
        )
    table = pa.table(
        {
            "image_id": [f"{uri[-8:]}-{i}" for i in range(n)],
            "image": schemas.image_column([encode_png(im) for im in images]),
            "label": [None if v is None else int(v) for v in labels],
            "split": splits,
            "source_uri": [f"synthetic://{i}" for i in range(n)],
            "source_width": [SIDE] * n,
            "source_height": [SIDE] * n,
        },
        schema=ImageShards(channels=channels, size=(SIDE, SIDE), label_names=None).schema(),
    )
    out = StageOutput(uri, "ingest", f"synthetic-{abs(hash(uri)) % 10**8}")
    marker = out.write_shard(0, table, {"read": n})
    out.commit(
        config={}, config_hash="synthetic", inputs=[], markers=[marker], counts={}, dataset=dataset.to_json()
    )
    return uri


@pytest.fixture(scope="module")
def sets(stack, tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    y_tr = np.arange(90) % CLASSES
    y_te = np.arange(45) % CLASSES
    x_tr, x_te = patterns(y_tr, 0), patterns(y_te, 1)
    real = image_set(
        str(root / "real"),
        np.concatenate([x_tr, x_te]),
        np.concatenate([y_tr, y_te]),
        ["train"] * 90 + ["test"] * 45,
    )
    y_gen = np.arange(60) % CLASSES
    good = patterns(y_gen, 2)
    return {
        "root": root,
        "real": real,
        "x_tr": x_tr,
        "good": image_set(str(root / "good"), good, y_gen, "train"),
        "shuffled": image_set(
            str(root / "shuffled"), good, np.random.default_rng(3).permutation(y_gen), "train"
        ),
        "y_gen": y_gen,
    }


def _cfg(sets, tmp_path, generated, **fields):
    base = dict(
        generated_uri=generated,
        reference_uri=sets["real"],
        output_uri=str(tmp_path / "eval"),
        inception="off",
        classifier=ClassifierRecipe(epochs=20, batch_size=16, lr=3e-3),  # 60 training images: 80 steps
    )
    return EvaluateConfig(**{**base, **fields})


def test_classifier_score_real_vs_real_and_shuffled_labels(sets, tmp_path):
    good = evaluate.run(_cfg(sets, tmp_path / "a", sets["good"]), EXP)
    f = good.figures
    assert f["classifier_score_real"] > 0.9 and f["classifier_score"] > 0.9  # the bars are easy to learn
    assert 0.9 < f["classifier_score_ratio"] < 1.1 and f["label_consistency"] > 0.9
    assert f["memorized_fraction"] < 0.1 and f["duplicate_fraction"] == 0 and f["class_balance"] > 0.99
    shuffled = evaluate.run(_cfg(sets, tmp_path / "b", sets["shuffled"]), EXP)
    assert shuffled.figures["classifier_score"] < 0.6  # chance is 1/3
    assert shuffled.figures["label_consistency"] < 0.6
    # the domain FID sees that the shuffled labels do not change the images, only their labels
    assert abs(shuffled.figures["domain_fid"] - f["domain_fid"]) < 1e-6 * max(1.0, f["domain_fid"])
    report = json.loads(storage.read_bytes(good.manifest.data_uris()[0]))
    assert report["per_class"]["c0"]["generated_images"] == 20 and "torch-fidelity" in report["libraries"]
    assert {i["name"] for i in report["inputs"]} == {"reference", "generated"}
    # the classifier trained on the real images is committed: sample's rejection sampling names it
    clf = model_store.describe(good.output_uri)
    assert clf.kind == "classifier" and (clf.config.classes, clf.config.size) == (CLASSES, (SIDE, SIDE))
    assert evaluate.run(_cfg(sets, tmp_path / "a", sets["good"]), EXP).cached


def test_memorisation_flags_planted_copies_and_duplicates(sets, tmp_path):
    y = sets["y_gen"]
    x = patterns(y, 2)
    x[:15] = sets["x_tr"][:15]  # a quarter: exact copies of training images
    x[15:20] = x[20:25]  # and five duplicates within the set
    labels = np.concatenate([np.arange(90)[:15] % CLASSES, y[15:]])
    uri = image_set(str(tmp_path / "copies"), x, labels, "train")
    res = evaluate.run(_cfg(sets, tmp_path, uri, classifier=None), EXP)
    assert 0.25 <= res.figures["memorized_fraction"] < 0.35
    assert abs(res.figures["duplicate_fraction"] - 5 / 60) < 1e-9


def test_inception_metrics_with_random_weights_and_registry_tags(sets, tmp_path):
    """FID of a set against itself is ~0, against a brightness-shifted copy clearly larger (random
    Inception weights of the right architecture); the generator's registry version gets eval tags."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Unloaded(FeatureExtractorInceptionV3):  # the architecture with its random initial weights
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None

    empty = tmp_path / "empty.pth"
    torch.save({}, empty)
    weights = tmp_path / inception.TORCH_FIDELITY_FILE
    torch.manual_seed(0)
    net = Unloaded("inception-v3-compat", ["2048"], str(empty))
    for m in net.modules():  # variance-preserving random weights: features that still vary at depth
        if isinstance(m, torch.nn.Conv2d | torch.nn.Linear):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(net.state_dict(), weights)

    x = torch.from_numpy(patterns(np.arange(6) % CLASSES, 1))[:, None]  # Inception at 299 px: few images
    net, _ = inception.find("required", str(weights))
    same = inception.metrics(x, x, net, 16, False)
    shifted = torch.from_numpy(patterns(np.arange(6) % CLASSES, 1, shift=80))[:, None]
    moved = inception.metrics(shifted, x, net, 16, False)
    assert abs(same["fid"]) < 1e-3 and moved["fid"] > 100 * max(abs(same["fid"]), 1e-3)
    assert {"kid", "is", "precision", "recall"} <= set(moved)

    import mlflow

    with mlflow.start_run(experiment_id=mlflow.set_experiment(EXP).experiment_id):
        reg = model_store.register(b"not a model, only a version to tag", "test-eval-gen", "candidate")
    y = sets["y_gen"]
    uri = image_set(
        str(tmp_path / "registered"), patterns(y, 2), y, "train", registry=("test-eval-gen", reg["version"])
    )
    res = evaluate.run(
        _cfg(
            sets,
            tmp_path,
            uri,
            inception="required",
            inception_weights_uri=str(weights),
            classifier=ClassifierRecipe(epochs=2, batch_size=16, lr=3e-3),
            max_images=6,
        ),
        EXP,
    )
    assert {"fid", "kid", "is", "precision", "recall", "classifier_score", "domain_fid"} <= set(res.figures)
    client = tracking._mlflow().tracking.MlflowClient()
    tags = client.get_model_version("test-eval-gen", str(reg["version"])).tags
    assert float(tags["eval/fid"]) == pytest.approx(res.figures["fid"], rel=1e-5)
    assert "eval/classifier_score" in tags
    arts = {a.path for a in client.list_artifacts(res.manifest.mlflow_run_id, "evaluation")}
    assert {"evaluation/real_vs_generated.png", "evaluation/per_class_scores.png"} <= arts


def test_bad_inputs_fail_before_any_work(sets, tmp_path, monkeypatch):
    y = sets["y_gen"]
    unlabelled = image_set(str(tmp_path / "unlabelled"), patterns(y, 2), [None] * len(y), "train")
    one = image_set(str(tmp_path / "one"), patterns(y[:1], 2), y[:1], "train")
    with pytest.raises(InputError, match="needs labels"):
        evaluate.plan(_cfg(sets, tmp_path, unlabelled))
    evaluate.plan(_cfg(sets, tmp_path, unlabelled, classifier=None))  # fine without the classifier
    with pytest.raises(InputError, match="holds 1 images"):
        evaluate.plan(_cfg(sets, tmp_path, one))
    rgb = str(tmp_path / "rgb")
    image_set(rgb, patterns(y, 2), y, "train", channels=3)
    with pytest.raises(InputError, match="channels"):
        evaluate.plan(_cfg(sets, tmp_path, rgb))
    with pytest.raises(FileNotFoundError, match="inception_weights_uri="):
        evaluate.plan(
            _cfg(
                sets, tmp_path, sets["good"], inception="required", inception_weights_uri=str(tmp_path / "no")
            )
        )
    # auto: the network found is an input of the plan (its sha256), or the note says why none ran
    # (the order and the messages: tests/infra/test_inception.py)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(inception, "torchscript_file", lambda: None)
    skipped = evaluate.plan(_cfg(sets, tmp_path, sets["good"], inception="auto"))
    assert skipped.inception is None and skipped.inception_note.startswith("skipped: ")
    cached = tmp_path / "torch" / "hub" / "checkpoints" / inception.TORCH_FIDELITY_FILE
    cached.parent.mkdir(parents=True)
    torch.save({"w": torch.zeros(1)}, cached)
    found = evaluate.plan(_cfg(sets, tmp_path, sets["good"], inception="auto"))
    assert found.inception.path == str(cached) and found.inception_note.startswith("ran (")
    sha = storage.file_sha256(cached)
    assert sha in found.inception_note and any(i.digest == sha for i in found.inputs)
    with pytest.raises(ConfigError, match="generated_uri"):
        evaluate.plan(_cfg(sets, tmp_path, ""))
    assert not storage.exists(str(tmp_path / "eval"))
    _ = stage  # the stage kit wrote the sets above


def test_tokenizer_evaluation(sets, tmp_path):
    """The stage also scores a tokenizer's reconstructions of the reference split."""
    from models import checkpoint
    from models.vqgan import VQGAN
    from tests.tiny import tiny_vqgan

    torch.manual_seed(0)
    path = tmp_path / "tok.safetensors"
    checkpoint.save_native(VQGAN(tiny_vqgan(in_channels=1, out_channels=1, codebook_size=16)).eval(), path)
    res = evaluate.run(_cfg(sets, tmp_path, "", tokenizer_uri=str(path)), EXP)
    f = res.figures
    assert {"tokenizer/psnr", "tokenizer/ssim", "tokenizer/codebook_usage"} <= set(f)
    assert 0 < f["tokenizer/codebook_usage"] <= 1 and f["tokenizer/psnr"] > 0 and "fid" not in f
