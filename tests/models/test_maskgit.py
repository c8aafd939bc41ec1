"""The masked prior: it learns what the raster prior learns from the same codes, its schedule keeps
its plan, greedy decoding with one code per step is greedy one-at-a-time by confidence, and a
sample depends on its own uniforms alone."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models import maskgit
from models.gpt import GPT, GPTConfig
from models.sampling import sample_uniforms
from tests.codes import rule_codes, unigram_bits

K, CLASSES, N = 16, 3, 16  # codebook, classes, codes per grid (4x4)


def _model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    # codes, the class tokens and a null token after them, then [MASK]
    cfg = GPTConfig(
        vocab_size=K + CLASSES + 2, block_size=1 + N, n_layer=2, n_head=2, n_embd=32, bidirectional=True
    )
    model = GPT(cfg)
    torch.nn.init.normal_(model.pos_emb, std=0.02)  # positions told apart from the start
    return model


def test_the_schedule_plans_the_cosine_and_one_per_step_at_the_limit():
    assert maskgit.schedule(16, 16) == list(range(15, -1, -1))
    plan = maskgit.schedule(64, 8)
    assert plan[-1] == 0 and all(a > b for a, b in zip(plan, plan[1:]))
    assert plan[0] == math.floor(64 * math.cos(math.pi / 2 / 8))
    with pytest.raises(ValueError, match="steps must lie"):
        maskgit.schedule(16, 17)


@pytest.mark.slow
def test_masked_training_beats_the_unigram_baseline():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, CLASSES, 512)
    codes = torch.from_numpy(rule_codes(labels, N, K, rng))
    prefix = torch.from_numpy(K + labels)[:, None]
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(600):
        i = torch.randint(0, len(codes), (64,), generator=g)
        loss = maskgit.masked_loss(model, prefix[i], codes[i], K, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        val = maskgit.masked_loss(model, prefix[:256], codes[:256], K, generator=g, ratio=0.5)
    bits = float(val) / math.log(2)
    baseline = unigram_bits(codes.numpy(), K)
    assert bits < 0.7 * baseline, (bits, baseline)  # 2.3 vs 4.0 bits here


def test_greedy_with_one_code_per_step_is_greedy_one_at_a_time():
    model = _model(1).eval()
    with torch.no_grad():
        model.head.weight.mul_(20.0)  # confident, distinct logits
    prefix = torch.tensor([[K], [K + 2]])
    got = maskgit.decode(model, prefix, N, K, steps=N, temperature=0, choice_temperature=0)
    mask = maskgit.mask_token(model)
    for row in range(2):
        x = torch.full((1, N), mask)
        with torch.no_grad():
            for _ in range(N):
                logp = model(torch.cat([prefix[row : row + 1], x], 1))[0, 1:, :K].float().log_softmax(-1)
                best, code = logp.max(-1)
                best[x[0] != mask] = -float("inf")
                pos = int(best.argmax())
                x[0, pos] = code[pos]
        assert torch.equal(got[row], x[0])
    assert (got < K).all()


def test_a_sample_depends_on_its_own_uniforms_alone():
    model = _model(2).eval()
    steps = 4
    labels = torch.tensor([0, 1, 2, 1, 0])
    prefix = (K + labels)[:, None]
    null = torch.full_like(prefix, K + CLASSES)
    u = sample_uniforms(7, range(5), 2 * steps * N)
    kw = dict(steps=steps, top_k=8, cfg_scale=2.0)
    whole = maskgit.decode(model, prefix, N, K, uniforms=u, null_prefix=null, **kw)
    alone = torch.cat(
        [
            maskgit.decode(model, prefix[i : i + 1], N, K, uniforms=u[i : i + 1], null_prefix=null[:1], **kw)
            for i in range(5)
        ]
    )
    assert torch.equal(whole, alone)
    other = maskgit.decode(
        model, prefix, N, K, uniforms=sample_uniforms(8, range(5), 2 * steps * N), null_prefix=null, **kw
    )
    assert not torch.equal(whole, other)
    assert ((whole >= 0) & (whole < K)).all()


def test_the_trainer_takes_the_masked_objective():
    from models.gpt_training import GPTRecipe, GPTTrainer, masked_bits

    rng = np.random.default_rng(1)
    labels = rng.integers(0, CLASSES, 256)
    codes = torch.from_numpy(rule_codes(labels, N, K, rng))
    prefix = torch.from_numpy(K + labels)[:, None]
    model = _model(3)
    trainer = GPTTrainer(model, GPTRecipe(warmup_steps=5, label_smoothing=0.1), K, 60, objective="masked")
    before = masked_bits(model, prefix, codes, K, 0.5)
    assert masked_bits(model, prefix, codes, K, 0.5) == before  # the same masks every call
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        i = torch.randint(0, len(codes), (32,), generator=g)
        logs = trainer.train_step(prefix[i], codes[i], g)
    assert math.isfinite(logs["loss"]) and masked_bits(trainer.final_model(), prefix, codes, K, 0.5) < before
    with pytest.raises(ValueError, match="needs a bidirectional model"):
        GPTTrainer(
            GPT(GPTConfig(vocab_size=K + 5, block_size=N + 1, n_layer=1, n_head=1, n_embd=8)),
            GPTRecipe(),
            K,
            10,
            objective="masked",
        )


def test_generate_codes_decodes_a_masked_generator_per_sample():
    """The sampling entry point every stage uses runs the masked decoding for a masked spec: each
    row as decode gives it alone, whatever the tile; a larger grid is refused."""
    from models.net2net import GeneratorSpec, native_condition
    from models.sampling import SamplerOptions, generate_codes, uniforms_needed

    cond, vocab = native_condition("class", K, 0.1, n_classes=CLASSES)
    spec = GeneratorSpec(condition=cond, codebook_size=K, grid=(4, 4), prefix_length=1, objective="masked")
    assert vocab + 1 == K + CLASSES + 2 and spec.block_size == 1 + N
    model = _model(4).eval()
    options = SamplerOptions(steps=4, top_k=8, cfg_scale=1.5)
    labels = torch.tensor([0, 2, 1])
    u = sample_uniforms(3, range(3), uniforms_needed(spec, options))
    assert u.shape == (3, 2 * 4 * N)
    a = generate_codes(model, spec, labels, u, options, tile=2)
    b = generate_codes(model, spec, labels, u, options, tile=8)
    null = torch.full((3, 1), cond.null_token)
    want = maskgit.decode(model, (K + labels)[:, None], N, K, 4, u, top_k=8, cfg_scale=1.5, null_prefix=null)
    assert torch.equal(a, b) and torch.equal(a, want)
    with pytest.raises(ValueError, match="training grid"):
        generate_codes(model, spec, labels, u, options, grid=(4, 8))


def test_train_gpt_plans_a_masked_prior(tmp_path):
    """objective=masked: a bidirectional model with a [MASK] id after the null token, a context of
    the whole sequence, the objective in the generator spec; local attention refused in one line."""
    from infra.config import ConfigError
    from stages import train_gpt
    from tests.codes import tokenizer_file, write_code_shards

    tok = tokenizer_file(tmp_path, K)
    codes = write_code_shards(
        str(tmp_path / "codes"),
        n_train=64,
        n_val=8,
        k=K,
        grid=(4, 4),
        classes=CLASSES,
        tokenizer_uri=tok[0],
        tokenizer_sha256=tok[1],
    )
    base = dict(codes_uri=codes.output_uri, condition="class", batch_size=8, sample_every=0, n_layer=1)
    p = train_gpt.plan(train_gpt.TrainGPTConfig(**base, objective="masked"))
    raster = train_gpt.plan(train_gpt.TrainGPTConfig(**base))
    assert p.gpt.bidirectional and not raster.gpt.bidirectional
    assert p.gpt.vocab_size == raster.gpt.vocab_size + 1 and p.gpt.block_size == raster.gpt.block_size + 1
    assert p.spec.objective == "masked" and p.spec.condition.null_token == p.gpt.vocab_size - 2
    with pytest.raises(ConfigError, match="objective=masked takes full attention"):
        train_gpt.plan(
            train_gpt.TrainGPTConfig(**base, objective="masked", attention="local2d", block_h=2, block_w=2)
        )
