"""GPT invariants: cache == recompute, filters, CFG, per-sample seeds, the window sampler."""

from __future__ import annotations

import pytest
import torch

from models import checkpoint
from models.gpt import GPT, PRESETS, GPTConfig
from models.net2net import ConditionConfig, Net2Net
from models.sampling import official_window_logits, sample_sliding_window
from models.token_sampling import top_k_filter, top_p_filter
from models.vqgan import VQGAN
from tests.tiny import TINY_VQGAN

TINY = GPTConfig(vocab_size=23, block_size=40, n_layer=2, n_head=2, n_embd=16)


def _gpt(cfg: GPTConfig = TINY, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    m = GPT(cfg).eval()
    for p in m.parameters():  # larger weights than the 0.02 init, so logits are far from uniform
        p.data.normal_(0, 0.5)
    return m


def _mingpt_params(c: GPTConfig) -> int:
    """minGPT's parameter count: per block 12 d^2 + 13 d, embeddings, positions, final norm, head."""
    d = c.n_embd
    return c.n_layer * (12 * d * d + 13 * d) + 2 * c.vocab_size * d + c.block_size * d + 2 * d


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build(name):
    """Every preset builds (on the meta device: no memory for the 1.4B one) with minGPT's
    parameters, and maps a full context to logits over the vocabulary."""
    cfg = PRESETS[name]
    with torch.device("meta"):
        m = GPT.from_config(name)
        logits = m(torch.zeros(1, cfg.block_size, dtype=torch.long))
    assert tuple(logits.shape) == (1, cfg.block_size, cfg.vocab_size)
    n = sum(p.numel() for p in m.parameters())
    assert n == _mingpt_params(cfg), name
    if name == "taming-cin":  # the paper's class-conditional ImageNet transformer: 1.4B parameters
        assert abs(n - 1.4e9) < 0.05 * 1.4e9, n


def test_cached_forward_equals_full_forward():
    m = _gpt()
    idx = torch.randint(0, 23, (3, 30))
    full = m(idx)
    cache = m.new_cache(3, 30)
    parts = [m(idx[:, :7], cache, 0)] + [m(idx[:, t : t + 1], cache, t) for t in range(7, 20)]
    parts.append(m(idx[:, 20:], cache, 20))  # a multi-token chunk after a prefix
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_generate_greedy_equals_recompute_and_n_unmasked():
    for cfg in (TINY, GPTConfig(**{**TINY.__dict__, "n_unmasked": 5})):
        m = _gpt(cfg)
        prefix = torch.randint(0, 23, (2, 6))
        out = m.generate(prefix, 20, temperature=0)
        seq = prefix
        for _ in range(20):
            seq = torch.cat([seq, m(seq)[:, -1].argmax(-1, keepdim=True)], 1)
        assert torch.equal(out, seq)


def test_n_unmasked_prefix_attends_bidirectionally():
    m = _gpt(GPTConfig(**{**TINY.__dict__, "n_unmasked": 4}))
    a = torch.randint(0, 23, (1, 10))
    b = a.clone()
    b[0, 3] = (a[0, 3] + 1) % 23  # change a later token inside the unmasked prefix
    assert not torch.allclose(m(a)[0, 0], m(b)[0, 0])  # position 0 sees it
    c = a.clone()
    c[0, 8] = (a[0, 8] + 1) % 23  # a token after the prefix stays invisible to earlier positions
    torch.testing.assert_close(m(a)[0, :8], m(c)[0, :8])


def test_top_k_and_top_p_masks_on_constructed_logits():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(top_k_filter(logits, 2)).tolist() == [[True, False, False, True, True]]
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    lp = probs.log()
    # p=0.6: 0.5 alone is below, so the token that crosses (0.3) is kept too
    assert torch.isinf(top_p_filter(lp, 0.6)).tolist() == [[False, False, True, True]]
    assert torch.isinf(top_p_filter(lp, 0.45)).tolist() == [[False, True, True, True]]
    assert torch.isinf(top_p_filter(lp, 0.99)).tolist() == [[False, False, False, False]]
    shuffled = lp[:, [2, 0, 3, 1]]  # order must not matter
    assert torch.isinf(top_p_filter(shuffled, 0.6)).tolist() == [[True, False, True, False]]


def test_filters_respected_by_sampling():
    m = _gpt()
    prefix = torch.randint(0, 23, (4, 3))
    out = m.generate(prefix, 10, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, m.generate(prefix, 10, temperature=0))  # top-1 sampling is greedy


def test_cfg_scale_one_equals_conditional():
    m = _gpt()
    prefix = torch.randint(0, 23, (3, 4))
    uncond = torch.zeros_like(prefix)
    gens = lambda: [torch.Generator().manual_seed(s) for s in range(3)]  # noqa: E731
    plain = m.generate(prefix, 12, generator=gens())
    guided = m.generate(prefix, 12, cfg_scale=1.0, uncond_prefix=uncond, generator=gens())
    assert torch.equal(plain, guided)
    strong = m.generate(prefix, 12, cfg_scale=4.0, uncond_prefix=uncond, temperature=0)
    assert strong.shape == plain.shape
    with pytest.raises(ValueError, match="uncond_prefix"):
        m.generate(prefix, 2, cfg_scale=2.0)


def test_seed_gives_same_sample_alone_and_in_batch():
    m = _gpt()
    prefix = torch.randint(0, 23, (5, 3))
    batch = m.generate(prefix, 15, generator=[torch.Generator().manual_seed(100 + i) for i in range(5)])
    for i in (0, 3):
        alone = m.generate(prefix[i : i + 1], 15, generator=[torch.Generator().manual_seed(100 + i)])
        assert torch.equal(alone[0], batch[i])
    other = m.generate(prefix, 15, generator=[torch.Generator().manual_seed(7 + i) for i in range(5)])
    assert not torch.equal(other, batch)


@pytest.mark.parametrize(("h", "w"), [(5, 7), (4, 4)])
def test_sliding_window_equals_official_rule(h, w):
    """Our cached window sampler reads exactly the logits of the official full-window forward."""
    g = 4
    m = _gpt(GPTConfig(vocab_size=23, block_size=2 * g * g, n_layer=2, n_head=2, n_embd=16))
    cond = torch.randint(0, 23, (2, h, w))
    ours = sample_sliding_window(m, cond, (h, w), g, temperature=0)
    img = torch.zeros_like(ours)
    for i in range(h):
        for j in range(w):
            img[:, i, j] = official_window_logits(m, cond, img, i, j, g).argmax(-1)
    assert torch.equal(ours, img)


def test_gpt_native_checkpoint_roundtrip(tmp_path):
    m = _gpt()
    checkpoint.save_native(m, tmp_path / "g.safetensors")
    m2, _ = checkpoint.load_native(tmp_path / "g.safetensors")
    assert m2.config == TINY
    idx = torch.randint(0, 23, (2, 9))
    assert torch.equal(m(idx), m2.eval()(idx))


def test_official_mask_buffer_is_accepted():
    m = _gpt()
    sd = dict(m.state_dict())
    sd["blocks.0.attn.mask"] = torch.tril(torch.ones(1, 1, 40, 40))
    m2 = GPT(TINY)
    m2.load_state_dict(sd, strict=True)


def test_net2net_class_condition_and_cfg():
    net = _tiny_net(ConditionConfig(mode="class", n_classes=3, token_offset=16, null_token=19), vocab=20)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    labels = torch.tensor([0, 2])
    assert net.encode_to_c(labels).tolist() == [[16], [18]]
    logits, target = net(x, labels)
    assert logits.shape == (2, 64, 20) and target.shape == (2, 64)
    assert float(net.loss(x, labels)) > 0
    codes = net.sample_codes(net.encode_to_c(labels), 64, cfg_scale=3.0, temperature=0)
    assert codes.shape == (2, 64)
    img = net.decode_codes(codes.clamp(max=15), (8, 8))
    assert img.shape == (2, 3, 16, 16)


def test_strided_window_sampler_is_valid_and_matches_its_own_rule():
    from models.sampling import _window_start

    g, s = 4, 2
    starts = [_window_start(i, 9, g, s) for i in range(9)]
    assert starts == sorted(starts) and all(
        0 <= st <= 9 - g and st <= i < st + g for i, st in enumerate(starts)
    )
    assert len(set(starts)) < len({_window_start(i, 9, g) for i in range(9)})  # fewer windows
    m = _gpt(GPTConfig(vocab_size=23, block_size=2 * g * g, n_layer=2, n_head=2, n_embd=16))
    cond = torch.randint(0, 23, (1, 6, 9))
    fast = sample_sliding_window(m, cond, (6, 9), g, temperature=0, stride=s)
    img = torch.zeros_like(fast)  # the same computation without caches, window by window
    for i in range(6):
        for j in range(9):
            rs, cs = _window_start(i, 6, g, s), _window_start(j, 9, g, s)
            seq = torch.cat(
                [
                    cond[:, rs : rs + g, cs : cs + g].reshape(1, -1),
                    img[:, rs : rs + g, cs : cs + g].reshape(1, -1),
                ],
                1,
            )
            img[:, i, j] = m(seq[:, :-1])[:, g * g - 1 + (i - rs) * g + (j - cs)].argmax(-1)
    assert torch.equal(fast, img)


def _tiny_net(cond: ConditionConfig, vocab: int) -> Net2Net:
    torch.manual_seed(0)
    vq = VQGAN(TINY_VQGAN).eval()
    return Net2Net(vq, _gpt(GPTConfig(vocab_size=vocab, block_size=80, n_layer=1, n_head=2, n_embd=16)), cond)


def test_coordinate_condition_as_taming_coord_stage():
    net = _tiny_net(ConditionConfig(mode="coord", coord_levels=15, coord_down=4), vocab=16)
    ys = torch.linspace(0, 1, 16)[:, None].expand(16, 16)[None, None]  # a vertical coordinate map
    tokens = net.encode_to_c(ys)
    assert tokens.shape == (1, 16) and tokens.min() >= 0 and tokens.max() <= 15
    expected = (15 * torch.nn.functional.avg_pool2d(ys, 4)).round().long().reshape(1, -1)
    assert torch.equal(tokens, expected)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        net.encode_to_c(ys * 2)


def test_condition_dropout_uses_null_token():
    net = _tiny_net(
        ConditionConfig(mode="class", n_classes=3, token_offset=16, null_token=19, cond_dropout=1.0), 20
    )
    net.train()
    seen = {}
    net.transformer.register_forward_hook(lambda mod, args, out: seen.setdefault("idx", args[0]))
    net(torch.rand(2, 3, 16, 16) * 2 - 1, torch.tensor([0, 1]))
    assert seen["idx"][:, 0].tolist() == [19, 19]


def test_generate_samples_only_image_codes():
    """``n_codes``: condition and null ids after the image codes are never sampled."""
    m = _gpt()
    out = m.generate(torch.full((4, 1), 20), 30, n_codes=5, generator=torch.Generator().manual_seed(0))
    assert int(out[:, 1:].max()) < 5
    assert (
        int(m.generate(torch.full((4, 1), 20), 30, generator=torch.Generator().manual_seed(0))[:, 1:].max())
        >= 5
    )
