"""The transformer stage through real Ray Train (2 workers), the MLflow server and registry, and S3."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from infra import model_store, schemas, stage, storage
from infra.config import ConfigError
from infra.devices import Resources
from models.gpt_training import GPTRecipe, bits_per_token
from models.net2net import condition_prefix
from stages import train_gpt
from stages.train_gpt import TrainGPTConfig
from tests.codes import tokenizer_file, unigram_bits, write_code_shards

K, GRID, CLASSES = 16, (8, 8), 4


@pytest.fixture(scope="module")
def shards(stack, tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt")
    tok_uri, tok_sha = tokenizer_file(root, K)
    common = dict(k=K, grid=GRID, classes=CLASSES, tokenizer_uri=tok_uri, tokenizer_sha256=tok_sha)
    labelled = write_code_shards(str(root / "codes"), n_train=512, n_val=128, **common)
    unlabelled = write_code_shards(str(root / "plain"), n_train=96, n_val=16, labelled=False, **common)
    depth = write_code_shards(str(root / "depth"), n_train=64, n_val=8, depth_codebook=12, **common)
    return {
        "root": root,
        "codes": labelled.output_uri,
        "plain": unlabelled.output_uri,
        "depth": depth.output_uri,
        "tokenizer": tok_uri,
    }


def _cfg(shards, output_uri: str, **kw) -> TrainGPTConfig:
    base = dict(
        codes_uri=shards["codes"],
        output_uri=output_uri,
        condition="class",
        n_layer=2,
        n_head=2,
        n_embd=32,
        steps=60,
        batch_size=32,
        recipe=GPTRecipe(lr=1e-2, warmup_steps=5),
        checkpoint_every=20,
        log_every=10,
        val_every=20,
        sample_every=30,
        samples_per_condition=4,
        resources=Resources(workers=2, cpus_per_worker=0.5),
    )
    return TrainGPTConfig(**{**base, **kw})


LOCAL = dict(attention="local2d", block_h=4, block_w=4, flange_top=2, flange_left=2, flange_right=2)


def test_two_workers_train_to_s3_validate_sample_register(shards, s3_bucket, mlflow_client):
    """With local 2D attention (full attention's stage run: the two-node pipeline test)."""
    recipe = GPTRecipe(lr=1e-2, warmup_steps=5, ema_decay=0.9)
    cfg = _cfg(shards, f"{s3_bucket}/gpt", register_name="test-gpt", recipe=recipe, **LOCAL)
    res = train_gpt.run(cfg, "test-gpt")
    m = res.manifest
    assert not res.cached and res.counts["steps"] == 60
    # the rule is learnt: val bits/token far below the codes' unigram entropy (~4 bits)
    held = stage.read_held_out(shards["codes"], ["codes"])[0]
    unigram = unigram_bits(schemas.decode_codes(held["codes"], 64), K)
    assert res.figures["val/unigram_bits_per_token"] == pytest.approx(unigram)
    assert res.figures["val/bits_per_token"] < 0.5 * unigram, res.figures
    run_id = m.mlflow_run_id
    for name in ("train/loss", "train/bits_per_token", "train/lr", "train/grad_norm", "train/tokens_per_s"):
        assert [x.step for x in mlflow_client.get_metric_history(run_id, name)] == [10, 20, 30, 40, 50, 60], (
            name
        )
    val = mlflow_client.get_metric_history(run_id, "val/bits_per_token")
    assert sorted(x.step for x in val) == [20, 40, 60]  # every val_every steps, and the final figure
    arts = {a.path for a in mlflow_client.list_artifacts(run_id, "samples")}
    assert arts == {"samples/step_0000030.png", "samples/step_0000060.png"}
    grid = mlflow_client.download_artifacts(run_id, "samples/step_0000060.png")
    from PIL import Image

    assert Image.open(grid).size[1] > CLASSES * 16  # one row of 16px samples per class
    # the model was published on S3, and the attempt (with its S3 checkpoints) cleared at the commit
    assert [f.path for f in m.files] == ["model.safetensors"] and m.output_uri.startswith("s3://")
    left = [u for u in storage.list_files(m.output_uri) if ".attempts/" in u]
    assert not left, left
    # registered with its figures as tags; one loader gives the GPT and what sampling needs
    version = mlflow_client.get_model_version("test-gpt", m.registered["version"])
    assert float(version.tags["val/bits_per_token"]) == pytest.approx(res.figures["val/bits_per_token"])
    gen = model_store.load_generator("models:/test-gpt@candidate")
    assert gen.spec.condition.mode == "class" and gen.spec.condition.n_classes == CLASSES
    assert gen.spec.codebook_size == K and gen.spec.grid == GRID and gen.spec.label_names[0] == "class0"
    assert gen.spec.condition.null_token == K + CLASSES  # cond_dropout 0.1 by default for classes
    assert gen.gpt.config.vocab_size == K + CLASSES + 1 and gen.gpt.config.block_size == 64
    c = gen.gpt.config  # the checkpoint carries the attention settings
    assert (c.attention, c.grid, c.n_prefix, c.block_h, c.block_w, c.flange_top) == (
        "local2d",
        GRID,
        1,
        4,
        4,
        2,
    )
    tok = model_store.load_tokenizer(gen.spec.tokenizer_uri, gen.spec.tokenizer_sha256)  # sha256 verified
    assert tok.config.codebook_size == K
    # the registered weights are the validated ones: the same bits/token on the held-out rows
    raw, codes, _ = train_gpt.held_out(cfg, train_gpt.plan(cfg))
    bits = bits_per_token(gen.gpt, condition_prefix(gen.spec.condition, raw), codes)
    assert bits == pytest.approx(res.figures["val/bits_per_token"], rel=1e-5)
    # a finished run resubmitted is a no-op
    again = train_gpt.run(dataclasses.replace(cfg, resources=Resources(workers=1)), "test-gpt")
    assert again.cached and again.manifest.mlflow_run_id == run_id


def test_bad_inputs_fail_before_any_work(shards, tmp_path):
    out = tmp_path / "never"

    def fails(match, **kw):
        cfg = _cfg(shards, str(out), **kw)
        with pytest.raises((stage.InputError, stage.NotCommittedError), match=match):
            train_gpt.run(cfg, "test-gpt")
        assert not out.exists()

    fails("has no labels in its train split", codes_uri=shards["plain"])
    fails("has no `depth_codes` column", condition="depth")
    fails("has no `segmentation_codes` column", condition="segmentation")
    fails(
        r"vocab_size=16 is below what the codes need: codebook of 16 codes \+ 5 condition tokens",
        vocab_size=16,
    )
    fails(r"block_size=32 is too short for a 8x8 grid: 1 condition tokens \+ 64 image tokens", block_size=32)
    fails("holds no committed stage output", codes_uri=str(tmp_path / "nothing"))
    fails("train_gpt.batch_size=4096 is split over 2 workers", batch_size=4096)
    fails("train_gpt.batch_size=1 is split over 2 workers", batch_size=1)  # fewer rows than workers
    missing = storage.join(str(shards["root"]), "moved.safetensors")
    fails("the tokenizer of the code shards .* cannot be found", tokenizer_uri=missing)
    with pytest.raises(ConfigError, match="local2d takes a one-token condition .* prefix of 16 tokens"):
        train_gpt.run(
            _cfg(shards, str(out), codes_uri=shards["depth"], condition="depth", **LOCAL), "test-gpt"
        )
    with pytest.raises(ConfigError, match="query blocks of 3x4 do not tile a 8x8 grid"):
        train_gpt.run(_cfg(shards, str(out), **{**LOCAL, "block_h": 3}), "test-gpt")
    assert not out.exists()


def test_other_conditions_become_prefixes(shards):
    """Unconditional, depth and coordinate prefixes from code-shard rows (no training)."""
    from models.net2net import coord_levels_map

    cfg = _cfg(shards, "unused", condition="unconditional")
    p = train_gpt.plan(cfg)
    assert p.spec.condition.null_token is None and p.gpt.vocab_size == K + 1 and p.spec.prefix_length == 1
    raw, codes, split = train_gpt.held_out(cfg, p)
    assert split == "val" and codes.shape == (128, 64)
    assert np.all(condition_prefix(p.spec.condition, raw).numpy() == K)
    # depth: the depth_codes column (4x4 codes of 12) as a 16-token prefix after the image codes
    cfg = _cfg(shards, "unused", codes_uri=shards["depth"], condition="depth")
    p = train_gpt.plan(cfg)
    assert (p.spec.prefix_length, p.spec.condition.cond_codebook_size, p.spec.condition_column) == (
        16,
        12,
        "depth_codes",
    )
    assert p.gpt.vocab_size == K + 12 and p.gpt.block_size == 16 + 64 - 1  # no dropout by default
    raw, codes, _ = train_gpt.held_out(cfg, p)
    prefix = condition_prefix(p.spec.condition, raw)
    assert prefix.shape == (8, 16) and int(prefix.min()) >= K and int(prefix.max()) < K + 12
    # coord: each row's code cells in the full image (identity view: the whole 16x16 image)
    cfg = _cfg(shards, "unused", condition="coord")
    p = train_gpt.plan(cfg)
    assert p.spec.prefix_length == 64 and p.spec.condition.coord_levels == 255
    rows = stage.read_committed_table(shards["codes"], ["image_id", "aug_id"]).slice(0, 3)
    got = p.derive(cfg)(rows)
    want = coord_levels_map(GRID, (16, 16), (0, 0), 16, 255).numpy()
    assert got["coord"].shape == (3, 64) and (got["coord"] == want).all()


def test_a_small_set_that_overfits_keeps_the_best_model_stops_early_and_warns(shards, mlflow_client):
    """16 rows of random codes (nothing to learn but the rows; one batch an epoch, so few steps):
    validation gets worse after the first checks. The committed model is the best validation's
    (what gets registered), patience stops both workers at the same step, and a model worse than
    the unigram baseline (on random codes, every model) is flagged."""
    import torch

    tok_sha = model_store.describe(shards["tokenizer"]).sha256
    common = dict(
        k=K, grid=GRID, classes=CLASSES, tokenizer_uri=shards["tokenizer"], tokenizer_sha256=tok_sha
    )
    codes = write_code_shards(str(shards["root"] / "tiny"), n_train=16, n_val=64, random_codes=True, **common)
    cfg = _cfg(
        shards,
        str(shards["root"] / "early"),
        codes_uri=codes.output_uri,
        n_embd=64,
        steps=200,
        batch_size=16,
        recipe=GPTRecipe(lr=1e-2, warmup_steps=2),
        val_every=5,
        patience=2,
        checkpoint_every=50,
        sample_every=0,
    )
    early = train_gpt.run(cfg)
    f = early.figures
    assert early.counts["steps"] < 200, "stopped early"
    assert (
        f["val/kept_step"] < early.counts["steps"] and f["val/bits_per_token"] < f["val/final_bits_per_token"]
    )
    gen = model_store.load_generator(early.output_uri)  # the committed model is the kept one
    held = stage.read_held_out(codes.output_uri, ["codes", "label"])[0]
    x = torch.from_numpy(schemas.decode_codes(held["codes"], GRID[0] * GRID[1]))
    prefix = condition_prefix(gen.spec.condition, torch.tensor(held["label"].to_pylist()))
    assert bits_per_token(gen.gpt.eval(), prefix, x) == pytest.approx(f["val/bits_per_token"], rel=1e-4)
    assert f["val/bits_per_token"] > f["val/unigram_bits_per_token"]
    assert "unigram baseline" in mlflow_client.get_run(early.manifest.mlflow_run_id).data.tags["warning"]


def test_a_masked_prior_trains_and_samples_in_parallel_passes(shards, tmp_path):
    """objective=masked on the same code shards: in 60 steps it beats the unigram entropy on bits per
    masked code (3.48 vs 3.98 here; tests/models/test_maskgit.py trains longer), its checkpoint
    carries the objective, and the sample stage decodes it in sampler.steps passes, the same codes
    whatever the batch and the actors."""
    from models.sampling import SamplerOptions
    from stages import sample
    from stages.sample import SampleConfig

    cfg = _cfg(shards, str(tmp_path / "masked"), objective="masked", sample_every=60)
    res = train_gpt.run(cfg, "test-gpt")
    assert res.figures["val/mask_ratio"] == 0.5
    assert res.figures["val/bits_per_token"] < 0.95 * res.figures["val/unigram_bits_per_token"], res.figures
    spec = model_store.describe_generator(res.output_uri).spec
    assert spec.objective == "masked" and spec.block_size == 1 + 64
    options = SamplerOptions(steps=4, top_k=8)
    runs = [
        sample.run(
            SampleConfig(
                model_uri=res.output_uri,
                output_uri=str(tmp_path / f"s{bs}"),
                samples_per_class=2,
                sampler=options,
                batch_size=bs,
                resources=Resources(workers=w),
            ),
            "test-gpt",
        )
        for bs, w in ((1, 1), (8, 2))
    ]
    a, b = (stage.read_committed_table(r.output_uri).sort_by("sample_index") for r in runs)
    assert a.num_rows == 2 * CLASSES and a["codes"].to_pylist() == b["codes"].to_pylist()
    with pytest.raises(stage.InputError, match="samples its 8x8 training grid only"):
        sample.plan(
            SampleConfig(
                model_uri=res.output_uri, output_uri=str(tmp_path / "x"), samples_per_class=1, grid=[8, 12]
            )
        )
