"""The sample stage through the real local Ray, MLflow server (registry) and S3 server."""

from __future__ import annotations

import dataclasses

import mlflow
import numpy as np
import pytest
import torch
import yaml

from infra import code_shards, image_shards, model_store, schemas, stage, storage, tracking
from infra.config import ConfigError
from infra.devices import Resources
from infra.imaging import pngs_to_array
from infra.stage import InputError
from models import checkpoint
from models.net2net import GeneratorSpec
from models.sampling import SamplerOptions, decode_tiles, generate_codes, sample_uniforms
from stages import sample, tokenize_images
from stages.sample import SampleConfig
from tests.codes import tokenizer_file, write_code_shards
from tests.generators import generator_file
from tests.killing import kill_stage_when

EXP = "test-sample"
K = 16


@pytest.fixture(scope="module")
def gens(stack, tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    tok = tokenizer_file(root, K)
    conditions = write_code_shards(
        str(root / "conditions"),
        n_train=6,
        n_val=3,
        k=K,
        grid=(8, 8),
        classes=3,
        tokenizer_uri=tok[0],
        tokenizer_sha256=tok[1],
        depth_codebook=8,
    )
    return {
        "root": root,
        "tokenizer": tok,
        "class": generator_file(root / "class.safetensors", tok),
        "uncond": generator_file(root / "uncond.safetensors", tok, mode="unconditional", cond_dropout=0),
        "depth": generator_file(
            root / "depth.safetensors", tok, mode="spatial", cond_codebook=8, prefix_length=16
        ),
        "conditions": conditions.output_uri,
    }


CLASS_RUN = dict(
    samples_per_class=4,
    samples_per_shard=5,
    sampler=SamplerOptions(cfg_scale=2.0, cfg_schedule="linear", top_k=8),
    seed=3,
)


@pytest.fixture(scope="module")
def class_run(gens):
    """12 class-conditional samples, batch 1, one actor."""
    cfg = SampleConfig(
        model_uri=gens["class"][0],
        output_uri=str(gens["root"] / "a"),
        batch_size=1,
        resources=Resources(workers=1),
        **CLASS_RUN,
    )
    return sample.run(cfg, EXP)


def _rows(uri: str):
    return stage.read_committed_table(uri, verify=True).sort_by("sample_index")


def test_samples_are_the_same_whatever_the_batch_actors_and_store(class_run, gens, s3_bucket):
    """Batch 1 / one actor against batch 7 / two actors, the generator through the MLflow registry,
    the output on S3: the same bytes; the bare in-process loop gives the same codes and images."""
    a = _rows(class_run.output_uri)
    assert class_run.counts == {"samples": 12, "shards": 3, "reused_shards": 0}
    assert a["label"].to_pylist() == [0, 1, 2] * 4 and a["sample_index"].to_pylist() == list(range(12))
    assert [f.name for f in schemas.IMAGE_FIELDS] == a.column_names[:7]  # the image-shard columns first
    assert a.num_rows == len(set(a["image_id"].to_pylist()))
    codes = schemas.decode_codes(a["codes"], 64)
    assert len({c.tobytes() for c in codes}) == 12  # every sample its own

    with mlflow.start_run(experiment_id=mlflow.set_experiment(EXP).experiment_id) as run:
        data = open(gens["class"][0], "rb").read()
        reg = model_store.register(data, "test-sample-gen", "candidate")
    b_cfg = SampleConfig(
        model_uri="models:/test-sample-gen@candidate",
        output_uri=f"{s3_bucket}/samples",
        batch_size=7,
        resources=Resources(workers=2),
        **CLASS_RUN,
    )
    b = sample.run(b_cfg, EXP)
    b_rows = _rows(b.output_uri)
    same = [c for c in a.column_names if c != "source_uri"]
    assert b_rows.select(same).equals(a.select(same))  # byte for byte: images, codes, ids
    v = reg["version"]
    assert b_rows["source_uri"].to_pylist() == [
        f"models:/test-sample-gen/{v}#seed=3&sample={i}" for i in range(12)
    ]
    gen = image_shards.describe(b.manifest).generation
    assert (gen.registry_name, gen.registry_version) == ("test-sample-gen", v)
    assert gen.training_run_id == run.info.run_id and gen.generator_sha256 == gens["class"][1]
    assert gen.tokenizer_sha256 == gens["tokenizer"][1]
    assert gen.sampler.cfg_scale == 2.0 and gen.label_counts == {"0": 4, "1": 4, "2": 4}
    assert sample.run(b_cfg, EXP).cached

    # the bare loop: one generate call over all 12, then the decoder
    gpt, extra = checkpoint.load_native(gens["class"][0])
    spec = GeneratorSpec.from_dict(extra["generator"])
    opts = SamplerOptions(cfg_scale=2.0, cfg_schedule="linear", top_k=8)
    labels = torch.tensor([0, 1, 2] * 4)
    bare = generate_codes(gpt.eval(), spec, labels, sample_uniforms(3, range(12), 64), opts)
    assert np.array_equal(bare.numpy(), codes)
    tok, _ = checkpoint.load_native(gens["tokenizer"][0])
    x = decode_tiles(tok.eval(), bare.reshape(-1, 8, 8))
    stored = torch.from_numpy(pngs_to_array(schemas.image_bytes(a["image"]), 1))
    assert torch.equal(stored, ((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1)

    # the MLflow child run: a grid of samples and the throughput
    client = tracking._mlflow().tracking.MlflowClient()
    arts = [f.path for f in client.list_artifacts(b.manifest.mlflow_run_id, "samples")]
    assert arts == ["samples/grid.png"] and b.figures["images_per_s"] > 0


def test_killed_run_resumes_byte_identical(class_run, gens, tmp_path):
    out = tmp_path / "killed"
    cfg_path = tmp_path / "cfg.yaml"
    fields = {**CLASS_RUN, "model_uri": gens["class"][0], "output_uri": str(out), "batch_size": 1}
    as_yaml = {**fields, "sampler": dataclasses.asdict(CLASS_RUN["sampler"])}
    cfg_path.write_text(yaml.safe_dump({"run": {"experiment": EXP}, "sample": as_yaml}))
    kill_stage_when("stages.sample", cfg_path, out, ".attempts/*/_shards/part-*.json")
    res = sample.run(SampleConfig(**{**fields, "batch_size": 4}), EXP)
    assert res.counts["reused_shards"] >= 1 and res.counts["samples"] == 12
    assert [f.sha256 for f in res.manifest.files] == [f.sha256 for f in class_run.manifest.files]
    assert _rows(res.output_uri)["sample_index"].to_pylist() == list(range(12))  # no duplicates


def test_unconditional_sliding_window_and_depth_conditional(gens, tmp_path):
    un = sample.run(
        SampleConfig(
            model_uri=gens["uncond"][0],
            output_uri=str(tmp_path / "uncond"),
            num_samples=3,
            grid=[10, 12],  # larger than the 8x8 training grid: the strided sliding window
            sampler=SamplerOptions(window="strided", window_stride=2),
        ),
        EXP,
    )
    t = _rows(un.output_uri)
    assert t.num_rows == 3 and t["label"].null_count == 3
    assert set(t["source_width"].to_pylist()) == {24} and set(t["source_height"].to_pylist()) == {20}
    assert pngs_to_array(schemas.image_bytes(t["image"]), 1).shape == (3, 1, 20, 24)
    described = image_shards.describe(un.manifest)
    assert (
        described.generation.grid == (10, 12) and described.size == (20, 24) and described.resolution is None
    )

    dep = sample.run(
        SampleConfig(
            model_uri=gens["depth"][0],
            output_uri=str(tmp_path / "depth"),
            conditions_uri=gens["conditions"],
            conditions_split="val",
            samples_per_condition=2,
            samples_per_shard=4,
            batch_size=3,
        ),
        EXP,
    )
    t = _rows(dep.output_uri)
    cond = stage.read_committed_table(gens["conditions"])
    val_ids = [i for i, s in zip(cond["image_id"].to_pylist(), cond["split"].to_pylist()) if s == "val"]
    ids = t["condition_image_id"].to_pylist()
    assert t.num_rows == 6 and sorted(set(ids)) == sorted(val_ids) and ids[0] == ids[1] != ids[2]
    # the condition steers the samples: greedy samples of the same condition agree, of others differ
    greedy = sample.run(
        SampleConfig(
            model_uri=gens["depth"][0],
            output_uri=str(tmp_path / "greedy"),
            conditions_uri=gens["conditions"],
            samples_per_condition=2,
            sampler=SamplerOptions(greedy=True),
        ),
        EXP,
    )
    g = _rows(greedy.output_uri)
    c = schemas.decode_codes(g["codes"], 64)
    assert g.num_rows == 18 and np.array_equal(c[0], c[1]) and not np.array_equal(c[0], c[2])
    assert image_shards.describe(greedy.manifest).generation.condition_rows == 9


def test_local_attention_samples_a_larger_grid_in_one_pass(gens, tmp_path):
    """A local2d generator trained on 8x8 codes samples 16x24 in one pass, the codes those of the
    model's own generate (no sliding window); a grid the blocks do not tile fails first."""
    window = dict(attention="local2d", block_h=4, block_w=4, flange_top=2, flange_left=2, flange_right=2)
    uri, _ = generator_file(tmp_path / "local.safetensors", gens["tokenizer"], window=window)
    cfg = SampleConfig(
        model_uri=uri, output_uri=str(tmp_path / "big"), samples_per_class=1, grid=[16, 24], seed=5
    )
    res = sample.run(cfg, EXP)
    t = _rows(res.output_uri)
    assert t.num_rows == 3 and set(t["source_width"].to_pylist()) == {48}
    assert set(t["source_height"].to_pylist()) == {32}
    gen = model_store.load_generator(uri)
    raw = torch.tensor(t["label"].to_pylist())
    u = sample_uniforms(5, t["sample_index"].to_pylist(), 16 * 24)
    want = generate_codes(gen.gpt, gen.spec, raw, u, SamplerOptions(), grid=(16, 24), tile=cfg.tile)
    assert np.array_equal(schemas.decode_codes(t["codes"], 16 * 24), want.numpy())
    with pytest.raises(InputError, match=r"sample.grid \[16, 18\]: local2d: query blocks of 4x4 do not tile"):
        sample.run(dataclasses.replace(cfg, grid=[16, 18], output_uri=str(tmp_path / "never")), EXP)


def test_generated_dataset_goes_through_tokenize(class_run, gens, tmp_path):
    """A generated dataset is image shards: tokenize reads it as it is, with its labels and names."""
    info = image_shards.describe(class_run.manifest)
    assert (info.channels, info.resolution, info.label_names) == (1, 16, ["class0", "class1", "class2"])
    res = tokenize_images.run(
        tokenize_images.TokenizeConfig(
            images_uri=class_run.output_uri,
            tokenizer_uri=gens["tokenizer"][0],
            output_uri=str(tmp_path / "c"),
        ),
        EXP,
    )
    assert res.counts["images"] == 12 and code_shards.describe(res.manifest).label_names == info.label_names
    codes = stage.read_committed_table(res.output_uri).sort_by("image_id")
    samples = _rows(class_run.output_uri).sort_by("image_id")
    assert codes["image_id"].equals(samples["image_id"]) and codes["label"].equals(samples["label"])
    # and back: the code shards hold the tokenizer's codes of the generated images (a random
    # tokenizer does not invert its own decoder, so these are not the sampled codes)
    tok, _ = checkpoint.load_native(gens["tokenizer"][0])
    with torch.no_grad():
        want = tok.eval().encode(torch.from_numpy(pngs_to_array(schemas.image_bytes(samples["image"]), 1)))[2]
    assert np.array_equal(schemas.decode_codes(codes["codes"], 64), want.reshape(12, 64).numpy())


def test_bad_inputs_fail_before_any_work(gens, tmp_path):
    out = tmp_path / "never"
    base = dict(model_uri=gens["class"][0], output_uri=str(out))

    def fails(exc, match, **fields):
        with pytest.raises(exc, match=match):
            sample.run(SampleConfig(**{**base, **fields}), EXP)

    fails(InputError, "unknown label 7", labels=[7])
    fails(InputError, "unknown label 'boot'", labels=["class1", "boot"], samples_per_class=2)
    fails(ConfigError, "samples_per_class, num_samples or labels")
    guided = SamplerOptions(cfg_scale=2.0)
    fails(InputError, "without a null condition", model_uri=gens["uncond"][0], num_samples=2, sampler=guided)
    fails(ConfigError, "unconditional", model_uri=gens["uncond"][0], samples_per_class=2)
    fails(InputError, "smaller than the training grid", samples_per_class=1, grid=[4, 4])
    fails(FileNotFoundError, "no-such-gen", model_uri="models:/no-such-gen@candidate", num_samples=1)
    fails(FileNotFoundError, "does not exist", model_uri=str(tmp_path / "missing.safetensors"), num_samples=1)
    # a tokenizer with other weights than the generator was trained with
    other = tokenizer_file(tmp_path, K + 1)
    fails(InputError, "sha256", samples_per_class=1, tokenizer_uri=other[0])
    # conditions that do not fit the generator: another codebook, another grid, no condition column
    shards = dict(n_train=4, n_val=0, k=K, grid=(8, 8), classes=2)
    shards.update(tokenizer_uri=gens["tokenizer"][0], tokenizer_sha256=gens["tokenizer"][1])
    wrong_k = write_code_shards(str(tmp_path / "wrong-k"), **shards, depth_codebook=5)
    no_depth = write_code_shards(str(tmp_path / "no-depth"), **shards)
    depth = dict(model_uri=gens["depth"][0])
    fails(InputError, "codebook of 5 codes", conditions_uri=wrong_k.output_uri, **depth)
    fails(InputError, "no `depth_codes` column", conditions_uri=no_depth.output_uri, **depth)
    fails(
        InputError,
        "16 condition codes, the generator needs 100",
        conditions_uri=gens["conditions"],
        grid=[10, 10],
        **depth,
    )
    fails(ConfigError, "conditions_uri", **depth)
    with pytest.raises(ValueError, match="top_p"):
        SampleConfig(**base, samples_per_class=1, sampler=SamplerOptions(top_p=1.5))
    assert not storage.exists(str(out))  # nothing was started


@pytest.mark.parity
def test_an_official_release_samples_its_greedy_codes(stack, tmp_path):
    """The official class-conditional Net2NetTransformer release as the generator: greedy samples of
    the stage hold the official code's greedy sequences, decoded by the bundled first stage."""
    from tests import fixtures

    release = fixtures.release_copy("taming/classcond", tmp_path)
    e = fixtures.expected("taming/classcond")
    labels = [int(v) for v in e["labels"][:2]]
    greedy = SamplerOptions(greedy=True)
    cfg = SampleConfig(
        model_uri=str(release), output_uri=str(tmp_path / "out"), labels=labels, sampler=greedy
    )
    res = sample.run(cfg, EXP)
    t = _rows(res.output_uri)
    assert t["label"].to_pylist() == labels
    assert image_shards.describe(res.manifest).generation.generator_format == "taming"
    assert np.array_equal(schemas.decode_codes(t["codes"], 64), e["greedy_out"].numpy())


def test_rejection_sampling_keeps_the_best_candidate(class_run, gens, tmp_path):
    """acceptance_rate 1/2: sample i is whichever of its two candidates (the rows 2i and 2i+1 of a
    run at rate 1 with the same labels) the classifier gives the higher probability of its class;
    the classifier is an input (its sha256), the rate is in the lineage."""
    from models.evaluation import Classifier, ClassifierConfig

    torch.manual_seed(0)
    names = ("class0", "class1", "class2")
    clf = Classifier(ClassifierConfig("resnet10t", 3, 1, (16, 16), names)).eval()
    clf_path = tmp_path / "classifier.safetensors"
    checkpoint.save_native(clf, clf_path)
    base = {**CLASS_RUN, "model_uri": gens["class"][0], "resources": Resources(workers=1), "batch_size": 4}
    half = sample.run(
        SampleConfig(
            **base, output_uri=str(tmp_path / "half"), acceptance_rate=0.5, classifier_uri=str(clf_path)
        ),
        EXP,
    )
    kept = _rows(half.output_uri)
    labels = kept["label"].to_pylist()
    doubled = {k: v for k, v in base.items() if k != "samples_per_class"}
    cands = sample.run(
        SampleConfig(
            **doubled, output_uri=str(tmp_path / "cands"), labels=[c for c in labels for _ in (0, 1)]
        ),
        EXP,
    )
    c = _rows(cands.output_uri)
    x = torch.from_numpy(
        np.rint((pngs_to_array(schemas.image_bytes(c["image"]), 1) + 1) * 127.5).astype(np.uint8)
    )
    prob = clf.probability(x, torch.tensor(c["label"].to_pylist())).reshape(-1, 2)
    best = (torch.arange(len(labels)) * 2 + prob.argmax(1)).tolist()
    assert kept["codes"].to_pylist() == [c["codes"].to_pylist()[j] for j in best]
    assert kept["image"].to_pylist() == [c["image"].to_pylist()[j] for j in best]
    assert half.figures["kept_class_probability"] == pytest.approx(float(prob.max(1).values.mean()), rel=1e-4)
    assert half.figures["kept_class_probability"] > half.figures["candidate_class_probability"]
    sha = model_store.file_sha256(clf_path)
    assert any(i.name == "classifier" and i.digest == sha for i in half.manifest.inputs)
    gen = image_shards.describe(half.manifest).generation
    assert (gen.acceptance_rate, gen.classifier_sha256) == (0.5, sha)

    # refused before any work: a rate that is not 1/k, no classifier, the wrong classifier
    with pytest.raises(ValueError, match="1/k"):
        SampleConfig(**base, acceptance_rate=0.3)
    with pytest.raises(ConfigError, match="needs classifier_uri"):
        sample.plan(SampleConfig(**base, output_uri=str(tmp_path / "x"), acceptance_rate=0.5))
    other = tmp_path / "other.safetensors"
    checkpoint.save_native(Classifier(ClassifierConfig("resnet10t", 5, 1, (16, 16))), other)
    with pytest.raises(InputError, match="5 classes"):
        sample.plan(
            SampleConfig(
                **base, output_uri=str(tmp_path / "x"), acceptance_rate=0.5, classifier_uri=str(other)
            )
        )
    assert not storage.exists(str(tmp_path / "x"))


def test_a_conditional_sample_larger_than_the_training_grid(gens, tmp_path):
    """A depth generator trained on 8x8 images with 8x8 condition codes samples 10x12 images from
    10x12 condition maps: the sliding window, its condition window aligned with the image window.
    The condition steers every position: greedy samples of one condition agree, of two differ."""
    tok = gens["tokenizer"]
    gen = generator_file(tmp_path / "d64.safetensors", tok, mode="spatial", cond_codebook=8, prefix_length=64)
    big = write_code_shards(
        str(tmp_path / "big"),
        n_train=0,
        n_val=2,
        k=K,
        grid=(10, 12),
        classes=2,
        tokenizer_uri=tok[0],
        tokenizer_sha256=tok[1],
        depth_codebook=8,
        depth_grid=(10, 12),
    )
    res = sample.run(
        SampleConfig(
            model_uri=gen[0],
            output_uri=str(tmp_path / "out"),
            conditions_uri=big.output_uri,
            samples_per_condition=2,
            grid=[10, 12],
            sampler=SamplerOptions(greedy=True),
        ),
        EXP,
    )
    t = _rows(res.output_uri)
    assert t.num_rows == 4 and pngs_to_array(schemas.image_bytes(t["image"]), 1).shape[2:] == (20, 24)
    c = schemas.decode_codes(t["codes"], 120)
    assert np.array_equal(c[0], c[1]) and not np.array_equal(c[0], c[2])
    assert image_shards.describe(res.manifest).generation.grid == (10, 12)
    with pytest.raises(
        InputError, match="120 condition codes, the generator needs 64"
    ):  # training grid, big maps
        sample.plan(
            SampleConfig(model_uri=gen[0], output_uri=str(tmp_path / "x"), conditions_uri=big.output_uri)
        )


def test_conditions_given_as_images_are_tokenized_and_fix_the_grid(gens, tmp_path):
    """A user's own condition maps, ingested as plain images: sample tokenizes them with the
    generator's condition tokenizer (greedy samples equal the bare loop fed those codes), 24x24
    maps give 12x12 codes (24x24 images, the sliding window) and the lineage names the maps;
    maps of the wrong channels, a grid the maps contradict and a different condition tokenizer
    fail before any work, in one line."""
    from models.vqgan import encode_batches
    from tests import images

    tok = gens["tokenizer"]
    edges_tok = tokenizer_file(tmp_path, 8, name="edges-tokenizer", seed=1)
    gen = generator_file(
        tmp_path / "edges.safetensors",
        tok,
        mode="spatial",
        cond_codebook=8,
        prefix_length=64,
        condition="edges",
        condition_tokenizer=edges_tok,
    )
    maps = images.ingested_noise(tmp_path / "m16", 3, 16, "L", EXP, classes="a", resolution=16, channels=1)
    greedy = SamplerOptions(greedy=True)
    res = sample.run(
        SampleConfig(
            model_uri=gen[0],
            output_uri=str(tmp_path / "out"),
            conditions_uri=maps.output_uri,
            samples_per_condition=2,
            sampler=greedy,
        ),
        EXP,
    )
    t = _rows(res.output_uri)
    g = image_shards.describe(res.manifest).generation
    assert (g.conditions_uri, g.conditions_column, g.grid) == (maps.output_uri, "image", (8, 8))
    assert any(i.name == "condition_tokenizer" and i.digest == edges_tok[1] for i in res.manifest.inputs)
    src = image_shards.rows_by_id(maps.output_uri, t["condition_image_id"].to_pylist(), ["image"])
    x = pngs_to_array(schemas.image_bytes(src["image"]), 1)
    cond_tok = model_store.load_first_stage(*edges_tok).model.eval()
    cond = torch.from_numpy(encode_batches(cond_tok, x, 4, "cpu", torch.float32).reshape(len(x), -1))
    gpt, extra = checkpoint.load_native(gen[0])
    spec = GeneratorSpec.from_dict(extra["generator"])
    u = sample_uniforms(0, list(range(len(x))), 64)
    want = generate_codes(gpt.eval(), spec, cond, u, greedy, grid=(8, 8))
    assert np.array_equal(schemas.decode_codes(t["codes"], 64), want.numpy())
    assert t.num_rows == 6 and len(set(t["condition_image_id"].to_pylist())) == 3

    big = images.ingested_noise(tmp_path / "m24", 2, 24, "L", EXP, classes="a", resolution=24, channels=1)
    res = sample.run(
        SampleConfig(model_uri=gen[0], output_uri=str(tmp_path / "big"), conditions_uri=big.output_uri), EXP
    )
    t = _rows(res.output_uri)
    assert image_shards.describe(res.manifest).generation.grid == (12, 12)
    assert pngs_to_array(schemas.image_bytes(t["image"]), 1).shape == (2, 1, 24, 24)

    rgb = images.ingested_noise(tmp_path / "rgb", 2, 16, "RGB", EXP, classes="a", resolution=16, channels=3)
    base = {"model_uri": gen[0], "output_uri": str(tmp_path / "x")}
    with pytest.raises(InputError, match="holds 3-channel images; edges maps for this generator have 1"):
        sample.plan(SampleConfig(**base, conditions_uri=rgb.output_uri))
    with pytest.raises(
        InputError, match=r"sample.grid \[10, 10\]: the 16x16 condition maps fix the grid at \[8, 8\]"
    ):
        sample.plan(SampleConfig(**base, conditions_uri=maps.output_uri, grid=[10, 10]))
    with pytest.raises(InputError, match="point condition_tokenizer_uri at the original weights"):
        sample.plan(SampleConfig(**base, conditions_uri=maps.output_uri, condition_tokenizer_uri=tok[0]))
    assert not storage.exists(str(tmp_path / "x"))
