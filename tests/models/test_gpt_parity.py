"""Parity with the official taming transformers (../shared/fixtures/taming/{uncond,classcond,depthcond})."""

from __future__ import annotations

import pytest
import torch

from models.sampling import sample_sliding_window
from models.taming_release import load_taming
from tests import fixtures

pytestmark = pytest.mark.parity
ATOL = 1e-4


@pytest.fixture(scope="module")
def load():
    def _load(name):
        return load_taming(fixtures.require(f"taming/{name}")).model, fixtures.expected(f"taming/{name}")

    return _load


def test_unconditional(load):
    m, e = load("uncond")
    assert m.cond.mode == "unconditional" and e["sos_token"] == 0
    with torch.no_grad():
        assert torch.equal(m.encode_to_z(e["x"]), e["codes"])
        logits, target = m(e["x"], e["x"])
        torch.testing.assert_close(logits, e["logits"], atol=ATOL, rtol=0)
        assert torch.equal(target, e["target"])
    prefix = torch.cat([torch.zeros(2, 1, dtype=torch.long), e["greedy_prefix"]], 1)  # SOS + 16 codes
    out = m.transformer.generate(prefix, 48, temperature=0)
    assert torch.equal(out[:, 1:], e["greedy_out"])
    # the cached generation equals a full recompute, token by token
    seq = prefix
    for _ in range(48):
        seq = torch.cat([seq, m.transformer(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(seq, out)


def test_class_conditional(load):
    m, e = load("classcond")
    assert m.cond.mode == "class" and m.cond.n_classes == 10
    with torch.no_grad():
        logits, target = m(e["x"], e["labels"])
        torch.testing.assert_close(logits, e["logits"], atol=ATOL, rtol=0)
        assert torch.equal(target, e["codes"])
    out = m.transformer.generate(m.encode_to_c(e["labels"][:2]), 64, temperature=0)
    assert torch.equal(out[:, 1:], e["greedy_out"])


def test_depth_conditional_and_sliding_window(load):
    m, e = load("depthcond")
    assert m.cond.mode == "spatial" and m.cond_stage.config.in_channels == 1
    with torch.no_grad():
        assert torch.equal(m.encode_to_c(e["depth"]), e["cond_codes"])
        logits, _ = m(e["x"], e["depth"])
        torch.testing.assert_close(logits, e["logits"], atol=ATOL, rtol=0)
        cond = m.encode_to_c(e["window_depth"]).reshape(1, 12, 14)
    assert torch.equal(cond, e["window_cond_codes"])
    codes = sample_sliding_window(m.transformer, cond, (12, 14), 8, temperature=0)
    assert torch.equal(codes, e["window_greedy_codes"])


def test_load_generator_resolves_an_official_release(tmp_path):
    """``infra.model_store.load_generator`` on an official Net2NetTransformer release folder: the
    same GPT as the importer, its condition, codebook and grid, and the bundled first stage."""
    from infra import model_store

    release = fixtures.release_copy("taming/classcond", tmp_path)
    gen = model_store.load_generator(str(release))
    e = fixtures.expected("taming/classcond")
    assert gen.format == "taming" and gen.spec.condition.mode == "class"
    assert gen.spec.condition.n_classes == 10
    assert gen.spec.codebook_size == 128 and gen.spec.grid == (8, 8) and gen.spec.prefix_length == 1
    out = gen.gpt.generate(e["labels"][:2, None].long(), 64, temperature=0, n_codes=gen.spec.codebook_size)
    assert torch.equal(out[:, 1:], e["greedy_out"])
    assert gen.first_stage is not None and gen.first_stage.config.codebook_size == 128
    header = model_store.describe_generator(str(release))  # the same facts from the config alone
    assert header.spec == gen.spec and header.sha256 == gen.sha256
    assert header.first_stage == gen.first_stage.config
