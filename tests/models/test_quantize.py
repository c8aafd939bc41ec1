"""Quantizer invariants on random inputs, parametrized over the options."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from models.quantize import GumbelQuantizer, QuantizerConfig, VectorQuantizer, usage_stats

OPTIONS = {
    "compat": QuantizerConfig(),
    "standard_loss": QuantizerConfig(legacy_loss=False),
    "l2": QuantizerConfig(l2_norm=True, legacy_loss=False),
    "ema": QuantizerConfig(ema_decay=0.9),
    "ema_restart_kmeans": QuantizerConfig(
        ema_decay=0.9, dead_code_threshold=0.5, kmeans_init=True, kmeans_iters=3
    ),
    "l2_restart": QuantizerConfig(l2_norm=True, dead_code_threshold=0.5),
}


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_codes_decode_to_quant(name):
    torch.manual_seed(0)
    q = VectorQuantizer(32, 4, OPTIONS[name])
    z = torch.randn(3, 4, 5, 6)
    q.train()
    q(z)  # a training step (updates EMA / restarts / k-means where enabled)
    q.eval()
    with torch.no_grad():
        out = q(z)
    assert out.codes.shape == (3, 5, 6) and out.codes.dtype == torch.int64
    assert int(out.codes.min()) >= 0 and int(out.codes.max()) < 32
    assert torch.equal(q.embed_codes(out.codes), out.quant)  # exactly
    assert out.loss.ndim == 0 and out.loss >= 0
    assert 0 < float(out.usage) <= 1 and 1 <= float(out.perplexity) <= 32
    # each code is the nearest (cosine for l2) codebook entry
    zf = out.quant.permute(0, 2, 3, 1).reshape(-1, 4)
    cb = q.codebook()
    zin = z.permute(0, 2, 3, 1).reshape(-1, 4)
    if OPTIONS[name].l2_norm:
        zin = torch.nn.functional.normalize(zin, dim=1)
    assert torch.equal(torch.cdist(zin, cb).argmin(1), out.codes.reshape(-1))
    assert torch.allclose(zf, cb[out.codes.reshape(-1)])


def test_gradients_reach_encoder_and_codebook():
    q = VectorQuantizer(16, 3, QuantizerConfig(legacy_loss=False))
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    out = q(z)
    (out.quant.sum() + out.loss).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0  # straight-through
    assert q.embedding.weight.grad.abs().sum() > 0


def test_legacy_and_standard_loss_weights():
    """Same value, different gradients: legacy puts beta on the codebook term."""
    torch.manual_seed(1)
    z = torch.randn(2, 3, 4, 4)
    grads = {}
    for legacy in (True, False):
        q = VectorQuantizer(8, 3, QuantizerConfig(legacy_loss=legacy, beta=0.25))
        q.embedding.weight.data = torch.linspace(-1, 1, 24).reshape(8, 3)
        zz = z.clone().requires_grad_(True)
        q(zz).loss.backward()
        grads[legacy] = (zz.grad.norm().item(), q.embedding.weight.grad.norm().item())
    # encoder gets weight 1 (legacy) vs beta (standard); codebook gets beta vs 1
    assert grads[True][0] == pytest.approx(4 * grads[False][0], rel=1e-5)
    assert grads[False][1] == pytest.approx(4 * grads[True][1], rel=1e-5)


def test_usage_stats_on_constructed_batch():
    codes = torch.tensor([[0, 0], [1, 1]])
    perplexity, usage, counts = usage_stats(codes, 8)
    assert float(perplexity) == pytest.approx(2.0, rel=1e-6)
    assert float(usage) == 2 / 8
    assert counts.tolist() == [2, 2, 0, 0, 0, 0, 0, 0]
    perplexity, usage, _ = usage_stats(torch.arange(8), 8)
    assert float(perplexity) == pytest.approx(8.0, rel=1e-6) and float(usage) == 1.0


def _toy_data(n: int, centres: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    pick = torch.randint(0, centres.shape[0], (n,), generator=gen)
    pts = centres[pick] + 0.05 * torch.randn(n, centres.shape[1], generator=gen)
    return pts.reshape(n, centres.shape[1], 1, 1)  # (N, D, 1, 1): one "pixel" per sample


def _collapsed(cfg: QuantizerConfig, k: int = 64, d: int = 4) -> VectorQuantizer:
    q = VectorQuantizer(k, d, cfg)
    q.embedding.weight.data[:] = 5.0  # every code identical and far from the data
    if cfg.ema_decay is not None:
        q.ema_embed_sum[:] = 5.0
    return q


@pytest.mark.parametrize("mode", ["ema_restart", "grad_restart", "no_restart"])
def test_dead_code_restart_revives_collapsed_codebook(mode):
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(64, 4, generator=gen) * 2
    cfg = {
        "ema_restart": QuantizerConfig(ema_decay=0.9, dead_code_threshold=1.0, usage_decay=0.9),
        "grad_restart": QuantizerConfig(legacy_loss=False, dead_code_threshold=1.0, usage_decay=0.9),
        "no_restart": QuantizerConfig(legacy_loss=False),
    }[mode]
    torch.manual_seed(0)
    q = _collapsed(cfg)
    opt = torch.optim.SGD(q.parameters(), lr=0.5) if cfg.ema_decay is None else None
    q.train()
    for _ in range(60):
        out = q(_toy_data(1024, centres, gen))
        if opt is not None:
            opt.zero_grad()
            out.loss.backward()
            opt.step()
    q.eval()
    with torch.no_grad():
        usage = float(q(_toy_data(4096, centres, gen)).usage)
    if mode == "no_restart":
        assert usage < 0.05  # stays collapsed: the contrast that makes the test meaningful
    else:
        assert usage > 0.9, usage


def test_kmeans_init_uses_the_codebook_from_step_one():
    gen = torch.Generator().manual_seed(3)
    centres = torch.randn(32, 4, generator=gen) * 3
    q = _collapsed(QuantizerConfig(kmeans_init=True, kmeans_iters=10), k=32)
    q.train()
    q(_toy_data(2048, centres, gen))
    q.eval()
    with torch.no_grad():
        assert float(q(_toy_data(2048, centres, gen)).usage) > 0.8
    assert bool(q.initted)


def test_gumbel_train_and_eval():
    q = GumbelQuantizer(6, 10, 4, QuantizerConfig(kind="gumbel", kl_weight=1.0))
    z = torch.randn(2, 6, 3, 3)
    q.eval()
    a, b = q(z), q(z)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.codes, q.logits(z).argmax(1))
    assert torch.equal(q.embed_codes(a.codes), a.quant)
    q.train()
    out = q(z.requires_grad_(True))
    out.quant.sum().backward()
    assert z.grad is not None and out.loss.ndim == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: dict) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(rank)  # different data and different restart draws on each rank
    q = _collapsed(QuantizerConfig(ema_decay=0.9, dead_code_threshold=1.0, usage_decay=0.9), k=16)
    q.train()
    for _ in range(10):
        q(torch.randn(256, 4, 1, 1) * (rank + 1))
    out[rank] = q.embedding.weight.detach().clone()
    dist.destroy_process_group()


@pytest.mark.slow
def test_codebook_identical_across_workers():
    # spawn, not fork: a forked child of a process with Ray initialised (the session's cluster) runs
    # Ray's exit hooks as the driver when it ends, and breaks the driver's later actor calls
    with mp.get_context("spawn").Manager() as manager:
        out = manager.dict()
        mp.spawn(_ddp_worker, args=(2, _free_port(), out), nprocs=2, join=True)
        a, b = out[0], out[1]
    assert torch.equal(a, b)
    assert not torch.equal(a, torch.full_like(a, 5.0))  # and it did change
