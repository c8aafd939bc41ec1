"""The GPT training recipe over codes (pure torch, no Ray): optimizer groups, corruption,
conditions as prefixes, resumable state, and that a learnable rule is learnt."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.gpt import GPT, GPTConfig
from models.gpt_training import GPTRecipe, GPTTrainer, bits_per_token, corrupt, param_groups, step_generator
from models.net2net import (
    ConditionConfig,
    GeneratorSpec,
    condition_prefix,
    coord_levels_map,
    drop_condition,
    native_condition,
)
from tests.codes import rule_codes, unigram_bits

K, T, CLASSES = 16, 16, 4


def _gpt(vocab: int, block: int = T, seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab, block_size=block, n_layer=2, n_head=2, n_embd=32, **kw))


def test_weight_decay_only_on_matmul_weights():
    m = _gpt(20)
    decay, no_decay = param_groups(m, 0.1)
    linear = {id(mod.weight) for mod in m.modules() if isinstance(mod, torch.nn.Linear)}
    assert {id(p) for p in decay["params"]} == linear and decay["weight_decay"] == 0.1
    names = {id(p): n for n, p in m.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert "tok_emb.weight" in skipped and "pos_emb" in skipped and "ln_f.weight" in skipped
    assert "blocks.0.attn.key.bias" in skipped and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))


def test_corruption_replaces_inputs_only():
    codes = torch.randint(0, K, (64, T))
    assert corrupt(codes, 1.0, K) is codes
    noisy = corrupt(codes, 0.5, K, torch.Generator().manual_seed(0))
    changed = (noisy != codes).float().mean().item()
    assert 0.35 < changed < 0.55  # 1/2 replaced, 1/16 of those by the same code
    assert int(noisy.max()) < K  # never a condition token


def test_native_condition_layout():
    cond, vocab = native_condition("class", K, 0.1, n_classes=CLASSES)
    assert (cond.token_offset, cond.null_token, vocab) == (K, K + CLASSES, K + CLASSES + 1)
    labels = torch.tensor([0, 3])
    assert condition_prefix(cond, labels).tolist() == [[K], [K + 3]]
    with pytest.raises(ValueError, match=r"class condition ids must lie in \[0, 4\)"):
        condition_prefix(cond, torch.tensor([4]))
    uncond, vocab_u = native_condition("unconditional", K, 0.1)
    assert uncond.null_token is None and vocab_u == K + 1  # nothing to drop
    assert condition_prefix(uncond, torch.zeros(3, 5)).tolist() == [[K]] * 3
    spatial, vocab_s = native_condition("spatial", K, 0.0, cond_codebook_size=8)
    assert vocab_s == K + 8 and condition_prefix(spatial, torch.full((2, 4), 7)).max() == K + 7
    # dropout: about the given share of rows becomes the null token, whole rows at a time
    prefix = condition_prefix(cond, torch.zeros(4000, dtype=torch.long))
    dropped = drop_condition(cond, prefix, torch.Generator().manual_seed(0))
    share = (dropped == cond.null_token).float().mean().item()
    assert 0.08 < share < 0.12 and set(dropped.unique().tolist()) == {K, K + CLASSES}


def test_coordinate_condition():
    # a 4x4 image as one 2x2 code grid: cell centres (0.5, 0.5), (0.5, 2.5), (2.5, 0.5), (2.5, 2.5)
    full = coord_levels_map((2, 2), (4, 4), (0, 0), 4, 160)
    assert full.tolist() == [round(160 * (0.5 * 4 + 0.5) / 16), 45, 105, 125]  # (y * 4 + x) / 16
    assert coord_levels_map((2, 2), (4, 4), (0, 0), 4, 160, flip=True).tolist() == [45, 25, 125, 105]
    # a 2x2 crop at (2, 2) of a 4x4 image, one code per pixel: the bottom-right pixels
    crop = coord_levels_map((2, 2), (4, 4), (2, 2), 2, 16)
    assert crop.tolist() == [10, 11, 14, 15]
    assert int(coord_levels_map((8, 8), (32, 32), (0, 0), 32, 255).max()) <= 255


def _rule_batches(n: int, seed: int):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, n)
    return torch.from_numpy(labels), torch.from_numpy(rule_codes(labels, T, K, rng))


def _train(cond: ConditionConfig, vocab: int, steps: int, seed=0, state=None, recipe=None, budget=None):
    """``steps`` steps of a run whose schedule ends at ``budget`` (default: ``steps``)."""
    recipe = recipe or GPTRecipe(lr=1e-2, warmup_steps=10)
    trainer = GPTTrainer(_gpt(vocab, seed=seed), recipe, K, budget or steps)
    if state is not None:
        trainer.load_state_dict(state)
    gen = torch.Generator()
    for step in range(trainer.step, steps):
        step_generator(gen, seed, 0, step)  # per step, as the stage: a resumed run draws the same
        labels, codes = _rule_batches(32, 1000 + step)
        trainer.train_step(drop_condition(cond, condition_prefix(cond, labels), gen), codes, gen)
    return trainer


def test_a_learnable_rule_is_learnt_below_the_unigram_entropy():
    labels, codes = _rule_batches(512, 7)
    unigram = unigram_bits(codes.numpy(), K)
    assert unigram > 3.9  # the codes alone are close to uniform: log2(16) = 4 bits
    cond, vocab = native_condition("class", K, 0.1, n_classes=CLASSES)
    trainer = _train(cond, vocab, 100)
    bits = bits_per_token(trainer.model, condition_prefix(cond, labels), codes)
    # the first code is uniform (4 bits of 16 tokens), the rest are determined by class + previous
    assert bits < 0.35 * unigram, (bits, unigram)
    uncond, vocab_u = native_condition("unconditional", K)
    blind = _train(uncond, vocab_u, 100)
    blind_bits = bits_per_token(blind.model, condition_prefix(uncond, labels), codes)
    assert bits < blind_bits  # the class is information the unconditional model lacks


def test_resumed_training_equals_uninterrupted():
    cond, vocab = native_condition("class", K, 0.1, n_classes=CLASSES)
    recipe = GPTRecipe(lr=3e-3, warmup_steps=3, ema_decay=0.9)
    straight = _train(cond, vocab, 12, recipe=recipe)
    first = _train(cond, vocab, 5, recipe=recipe, budget=12)
    resumed = _train(cond, vocab, 12, seed=0, state=first.state_dict(), recipe=recipe)
    assert resumed.step == 12
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    ema = resumed.eval_model().state_dict()["tok_emb.weight"]
    assert not torch.equal(ema, resumed.model.state_dict()["tok_emb.weight"])  # the EMA copy


def test_generator_spec_round_trip():
    cond, _ = native_condition("class", K, 0.1, n_classes=CLASSES)
    spec = GeneratorSpec(cond, K, (4, 4), "models:/tok@candidate", "ab" * 32, ["a", "b", "c", "d"])
    assert spec.block_size == 1 + 16 - 1
    assert GeneratorSpec.from_dict(spec.to_dict()) == spec
