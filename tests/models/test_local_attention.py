"""Local attention in the GPT (``local2d``, ``local1d``): the blocked computation against a dense
reference built here from the geometry alone, equality with full attention when the window covers
the grid, visibility by gradients, cached sampling against recomputation, larger grids, and the
settings in a checkpoint."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from models import checkpoint
from models import local_attention as local
from models.gpt import GPT, GPTConfig

BASE = GPTConfig(vocab_size=31, block_size=64, n_layer=2, n_head=2, n_embd=16)
# 8x8 grid, query blocks 2x4, 2 rows above, 1 column left, 3 right, 2 condition tokens
LOCAL2D = dataclasses.replace(
    BASE,
    attention="local2d",
    grid_h=8,
    grid_w=8,
    n_prefix=2,
    block_h=2,
    block_w=4,
    flange_top=2,
    flange_left=1,
    flange_right=3,
)
LOCAL1D = dataclasses.replace(LOCAL2D, attention="local1d", block_w=8, flange_left=12)


def _gpt(cfg: GPTConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    m = GPT(cfg).eval()
    for p in m.parameters():  # far from the zero init of the biases and embeddings
        p.data.normal_(0, 0.5)
    return m


def _visible(cfg: GPTConfig, grid=None) -> torch.Tensor:
    """(N, N) in raster order: code r' may inform the prediction of code r, from the definition:
    r' is generated before r and lies in the memory rectangle of r's query block."""
    h, w = grid or cfg.grid
    n = h * w
    if cfg.attention == "local1d":
        rank = torch.arange(n)
        qb = rank // cfg.block_w
        lo = qb * cfg.block_w - cfg.flange_left
        return (rank[None, :] < rank[:, None]) & (rank[None, :] >= lo[:, None])
    r, c = torch.arange(n) // w, torch.arange(n) % w
    br, bc = r // cfg.block_h, c // cfg.block_w
    rank = (
        (br * (w // cfg.block_w) + bc) * (cfg.block_h * cfg.block_w)
        + (r % cfg.block_h) * cfg.block_w
        + c % cfg.block_w
    )
    top, left = br * cfg.block_h - cfg.flange_top, bc * cfg.block_w - cfg.flange_left
    bottom, right = (br + 1) * cfg.block_h, (bc + 1) * cfg.block_w + cfg.flange_right
    inside = (
        (r[None, :] >= top[:, None])
        & (r[None, :] < bottom[:, None])
        & (c[None, :] >= left[:, None])
        & (c[None, :] < right[:, None])
    )
    return inside & (rank[None, :] < rank[:, None])


def test_blocked_attention_equals_a_dense_masked_reference():
    """One attention over the whole sequence against a dense (N x N) computation whose mask and
    relative offsets come from the geometry, not from the layout tables."""
    cfg = LOCAL2D
    win, p = cfg.window(), cfg.n_prefix
    lay = local.layout(win)
    n = lay.order.numel()
    torch.manual_seed(1)
    b, nh, hd = 2, cfg.n_head, 4
    q, k, v = (torch.randn(b, nh, p - 1 + n, hd) for _ in range(3))
    bias = torch.randn(nh, win.n_rel)
    got = local.blocked_attention(q, k, v, p, lay, bias)

    # reference in slot order: slot s holds generation position s (raster lay.order[s])
    raster = lay.order
    r, c = raster // cfg.grid_w, raster % cfg.grid_w
    vis_raster = _visible(cfg)
    # slot s (s >= 1) holds the code generated at s - 1, so query s sees slot m iff m - 1 is visible
    # from s or m == s, i.e. m's position is generated before s's and lies in s's window
    t = p - 1 + n
    allowed = torch.zeros(t, t, dtype=torch.bool)
    add = torch.zeros(nh, t, t)
    allowed[: p - 1, : p - 1] = torch.tril(torch.ones(p - 1, p - 1, dtype=torch.bool))
    n_dx = 2 * cfg.block_w - 1 + cfg.flange_left + cfg.flange_right
    for s in range(n):
        allowed[p - 1 + s, :p] = True  # every condition token (slot 0 included)
        for m in range(1, s + 1):
            if m == s or vis_raster[raster[s], raster[m]]:
                allowed[p - 1 + s, p - 1 + m] = True
                dy, dx = int(r[m] - r[s]), int(c[m] - c[s])
                add[:, p - 1 + s, p - 1 + m] = bias[
                    :, (dy + cfg.block_h - 1 + cfg.flange_top) * n_dx + dx + cfg.block_w - 1 + cfg.flange_left
                ]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd) + add
    want = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["local2d", "local1d"])
def test_local_equals_full_attention_when_the_window_covers_the_grid(kind):
    cfg = dataclasses.replace(
        LOCAL2D,
        attention=kind,
        block_h=8,
        block_w=64 if kind == "local1d" else 8,
        flange_top=0,
        flange_left=0,
        flange_right=0,
        n_prefix=1,
    )
    loc = _gpt(cfg)
    for layer in loc.blocks:
        layer.attn.rel_bias.data.zero_()  # full attention has no relative bias
    full = GPT(dataclasses.replace(BASE, block_size=64)).eval()
    state = {
        k: v for k, v in loc.state_dict().items() if "rel_bias" not in k and k not in ("pos_emb", "blk_emb")
    }
    # the full model's absolute positions: the prefix's, then the in-block (= whole grid) ones
    state["pos_emb"] = torch.cat([loc.pos_emb + loc.blk_emb[:, :1], loc.blk_emb[:, 1:]], 1)
    full.load_state_dict(state)
    x = torch.randint(0, 31, (3, 64))
    torch.testing.assert_close(loc(x), full(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg", [LOCAL2D, LOCAL1D], ids=["local2d", "local1d"])
def test_a_prediction_depends_on_its_window_only(cfg):
    """Gradients of each code's logits w.r.t. the input codes' embeddings: a one-layer model sees
    exactly the window (nothing outside it, nothing not yet generated); deeper, never the future."""
    one = _gpt(dataclasses.replace(cfg, n_layer=1))
    deep = _gpt(cfg)
    p, n = cfg.n_prefix, cfg.grid_h * cfg.grid_w
    x = torch.randint(0, 31, (1, p + n - 1))
    want = _visible(cfg)
    order = one.generation_order()
    rank = torch.empty(n, dtype=torch.long)
    rank[order] = torch.arange(n)
    for model, exact in ((one, True), (deep, False)):
        emb = model.tok_emb
        seen = torch.zeros(n, n, dtype=torch.bool)
        for r in range(n):
            outs: list[torch.Tensor] = []

            def keep(module, inputs, out, outs=outs):
                out.retain_grad()
                outs.append(out)

            handle = emb.register_forward_hook(keep)
            logits = model(x)
            handle.remove()
            logits[0, p - 1 + r].sum().backward()
            # the two embedding calls: the prefix, then the slots (the codes in generation order)
            g = outs[1].grad[0].abs().sum(-1)  # (N - 1,) slot s + 1 holds code order[s]
            for s in range(n - 1):
                seen[r, order[s]] = bool(g[s] > 0)
            model.zero_grad()
        future = rank[None, :] >= rank[:, None]
        assert not (seen & future).any(), "a prediction depends on a code not generated before it"
        if exact:
            # slot m (generation position m) holds the code generated before it (order[m - 1]):
            # code r's slot sees its own slot and the visible positions of its window
            expect = torch.zeros(n, n, dtype=torch.bool)
            for r in range(n):
                for m in range(1, int(rank[r]) + 1):
                    if m == rank[r] or want[r, order[m]]:
                        expect[r, order[m - 1]] = True
            assert torch.equal(seen, expect)


@pytest.mark.parametrize("cfg", [LOCAL2D, LOCAL1D], ids=["local2d", "local1d"])
@pytest.mark.parametrize("grid", [None, (16, 24)], ids=["training-grid", "larger-grid"])
def test_cached_sampling_equals_recomputation(cfg, grid):
    m = _gpt(cfg)
    h, w = grid or cfg.grid
    n, p = h * w, cfg.n_prefix
    x = torch.randint(0, 31, (3, p + n - 1))
    full = m(x, grid=grid)
    order = m.generation_order(grid)
    codes = torch.cat([x[:, p:], torch.zeros(3, 1, dtype=torch.long)], 1)[:, order]
    cached = m.cached_logits(x[:, :p], codes[:, :-1], grid=grid)
    torch.testing.assert_close(cached, full[:, p - 1 :][:, order], rtol=1e-4, atol=1e-4)


def test_the_ring_cache_does_not_grow_with_the_rows():
    m = _gpt(LOCAL2D)
    small, tall = m.new_local_cache(2, (8, 8)), m.new_local_cache(2, (64, 8))
    assert small.kv.shape == tall.kv.shape  # the prefix, (block_h + flange_top) rows of 8 columns, a zero row
    assert small.kv.shape[4] == LOCAL2D.n_prefix + (LOCAL2D.block_h + LOCAL2D.flange_top) * 8 + 1
    one = GPT(LOCAL1D).new_local_cache(2, (64, 64))
    assert one.kv.shape[4] == LOCAL1D.n_prefix + LOCAL1D.block_w + LOCAL1D.flange_left + 1


def test_generate_samples_larger_grids_reproducibly_per_sample():
    m = _gpt(LOCAL2D)
    prefix = torch.randint(0, 31, (4, 2))
    u = torch.rand(4, 16 * 16)
    out = m.generate(prefix, 256, uniforms=u, grid=(16, 16))
    assert out.shape == (4, 2 + 256)
    alone = m.generate(prefix[2:3], 256, uniforms=u[2:3], grid=(16, 16))
    assert torch.equal(alone, out[2:3])
    # the sampled codes are the inverse-CDF draws of the recomputed logits, position by position
    logits = m(out[:, :-1], grid=(16, 16))[:, 1:]
    probs = logits.softmax(-1).double()
    cdf = probs.cumsum(-1)
    want = torch.searchsorted(cdf, (u * cdf[..., -1]).unsqueeze(-1), right=True).squeeze(-1).clamp(max=30)
    agree = (want == out[:, 2:]).float().mean()
    assert agree > 0.99  # float noise may flip a draw that sits on a boundary
    with pytest.raises(ValueError, match="whole grids"):
        m.generate(prefix, 100, grid=(16, 16))
    with pytest.raises(ValueError, match="do not tile"):
        m.generate(prefix, 90, grid=(9, 10))


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="do not tile a 8x6 grid"):
        dataclasses.replace(LOCAL2D, grid_w=6)
    with pytest.raises(ValueError, match="attention must be one of"):
        dataclasses.replace(BASE, attention="sparse")
    with pytest.raises(ValueError, match="needs grid_h"):
        dataclasses.replace(BASE, attention="local2d")


def test_checkpoints_carry_the_attention_settings(tmp_path):
    m = _gpt(LOCAL2D)
    checkpoint.save_native(m, tmp_path / "gpt.ckpt")
    back, _ = checkpoint.load_native(tmp_path / "gpt.ckpt")
    assert back.config == LOCAL2D
    x = torch.randint(0, 31, (2, 2 + 64 - 1))
    torch.testing.assert_close(back.eval()(x), m(x))
