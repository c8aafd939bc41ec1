"""Local attention over a code grid, as the Image Transformer's (Parmar et al., ICML 2018): the
geometry, the generation order and the blocked computation that :mod:`models.gpt` runs.

``local2d``: the grid is cut into query blocks of ``block_h x block_w`` codes; blocks are generated
in raster order and the codes inside a block in raster order. A query block attends to its memory
block: itself, ``flange_top`` rows above it and ``flange_left`` / ``flange_right`` columns beside it,
of which only the positions already generated (in that order) are visible. ``local1d`` is the
same on the raster sequence seen as one row: query blocks of ``block_w`` consecutive codes, memory
``flange_left`` codes before them.

Cost: every query block attends to ``lm = (block_h + flange_top) * (block_w + flange_left +
flange_right)`` keys (plus the condition prefix), so a layer costs ``N * lm`` per head for N codes:
linear in the grid. The computation gathers each block's memory (``N / lq`` blocks of ``lm`` keys)
and runs one batched attention over blocks; no N x N matrix is formed.

Positions are relative: a learned bias per head for each (row, column) offset between a query
and a key inside the window (shared by all blocks), and a learned embedding of each position
inside its query block, which tells a slot where the code it holds came from (the input at a
position is the code generated before it). Neither depends on the grid's size, so a model trained
on one grid samples larger ones, the window sliding with the position.

Sampling keeps a ring of keys/values of ``min(rows, block_h + flange_top)`` grid rows (one block
row: ``block_w + flange_left`` columns): exactly what a later query can still see, so the memory
and the work of a step do not grow with the number of rows.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

KINDS = ("local1d", "local2d")


@dataclass(frozen=True)
class Window:
    """The geometry on a grid of ``rows x cols`` (local1d: 1 x number of codes)."""

    rows: int
    cols: int
    block_h: int
    block_w: int
    top: int
    left: int
    right: int

    @property
    def query_len(self) -> int:
        return self.block_h * self.block_w

    @property
    def memory_len(self) -> int:
        return (self.block_h + self.top) * (self.block_w + self.left + self.right)

    @property
    def n_rel(self) -> int:
        """Size of the relative-offset table: every (dy, dx) a query can see."""
        return (2 * self.block_h - 1 + self.top) * (2 * self.block_w - 1 + self.left + self.right)


def window(kind: str, grid: tuple[int, int], block: tuple[int, int], flange: tuple[int, int, int]) -> Window:
    """The window of ``kind`` on a code grid (h, w); ``block`` (h, w), ``flange`` (top, left, right).
    A grid that the query blocks do not tile fails here, naming both."""
    h, w = grid
    bh, bw = block
    top, left, right = flange
    if kind == "local1d":
        win = Window(1, h * w, 1, bw, 0, left, 0)
    elif kind == "local2d":
        win = Window(h, w, bh, bw, top, left, right)
    else:
        raise ValueError(f"local attention kind must be one of {KINDS}, got {kind!r}")
    if min(win.block_h, win.block_w) < 1 or min(win.top, win.left, win.right) < 0:
        raise ValueError(f"{kind}: query blocks need positive sides and flanges >= 0, got {block} / {flange}")
    if win.rows % win.block_h or win.cols % win.block_w:
        what = f"{h * w} codes" if kind == "local1d" else f"a {h}x{w} grid"
        size = f"{bw}" if kind == "local1d" else f"{bh}x{bw}"
        raise ValueError(f"{kind}: query blocks of {size} do not tile {what}")
    return win


@dataclass(frozen=True)
class Layout:
    """The tables one window needs (CPU tensors; :func:`layout_on` moves them)."""

    order: torch.Tensor  # (N,) raster index of generation slot k
    slot_of: torch.Tensor  # (N,) generation slot of raster index r (order's inverse)
    mem: torch.Tensor  # (nb, lm) slot of each memory position of block b; N outside the grid
    allowed: torch.Tensor  # (nb, lq, lm) query i of block b may see memory position j
    rel: torch.Tensor  # (lq, lm) index into the relative-offset table
    addr: torch.Tensor  # (N,) ring address of slot k
    mem_addr: torch.Tensor  # (nb, lm) ring address of each memory position; ring_size outside
    ring_size: int
    win: Window


@functools.lru_cache(maxsize=32)
def layout(win: Window) -> Layout:
    """Generation order, memory blocks, visibility and ring addresses of ``win``.

    Slot k holds the k-th generated position; slot 0 is the last condition token, which every
    position sees through the prefix, so it is never part of a memory block."""
    r_, c_, bh, bw = win.rows, win.cols, win.block_h, win.block_w
    nbr, nbc, lq, n = r_ // bh, c_ // bw, win.query_len, r_ * c_
    br, bc, ir, ic = torch.meshgrid(
        torch.arange(nbr), torch.arange(nbc), torch.arange(bh), torch.arange(bw), indexing="ij"
    )
    rows, cols = (br * bh + ir).reshape(-1), (bc * bw + ic).reshape(-1)
    order = rows * c_ + cols
    slot_of = torch.empty(n, dtype=torch.long)
    slot_of[order] = torch.arange(n)
    mr = torch.arange(bh + win.top) - win.top  # memory rows/cols relative to the block's corner
    mc = torch.arange(bw + win.left + win.right) - win.left
    origin_r = (torch.arange(nbr) * bh).repeat_interleave(nbc)  # (nb,)
    origin_c = (torch.arange(nbc) * bw).repeat(nbr)
    m_rows = (origin_r[:, None, None] + mr[None, :, None]).expand(-1, -1, len(mc)).reshape(nbr * nbc, -1)
    m_cols = (origin_c[:, None, None] + mc[None, None, :]).expand(-1, len(mr), -1).reshape(nbr * nbc, -1)
    inside = (m_rows >= 0) & (m_rows < r_) & (m_cols >= 0) & (m_cols < c_)
    mem = torch.where(inside, slot_of[(m_rows * c_ + m_cols).clamp(0, n - 1)], n)
    q_slot = torch.arange(nbr * nbc)[:, None] * lq + torch.arange(lq)[None, :]
    allowed = (mem[:, None, :] <= q_slot[:, :, None]) & (mem[:, None, :] >= 1)
    q_r, q_c = torch.arange(bh).repeat_interleave(bw), torch.arange(bw).repeat(bh)  # (lq,) in-block
    dy = mr.repeat_interleave(len(mc))[None, :] - q_r[:, None]  # (lq, lm)
    dx = mc.repeat(len(mr))[None, :] - q_c[:, None]
    n_dx = 2 * bw - 1 + win.left + win.right
    rel = (dy + bh - 1 + win.top) * n_dx + (dx + bw - 1 + win.left)
    ring_rows = min(r_, bh + win.top)
    ring_cols = c_ if nbr > 1 else min(c_, bw + win.left)
    ring_size = ring_rows * ring_cols
    addr = (rows % ring_rows) * ring_cols + cols % ring_cols
    mem_addr = torch.where(inside, (m_rows % ring_rows) * ring_cols + m_cols % ring_cols, ring_size)
    return Layout(order, slot_of, mem, allowed, rel, addr, mem_addr, ring_size, win)


@functools.lru_cache(maxsize=32)
def layout_on(win: Window, device: torch.device) -> Layout:
    """:func:`layout` with its tensors on ``device`` (kept per device)."""
    cpu = layout(win)
    moved = {
        f.name: v.to(device)
        for f in dataclasses.fields(cpu)
        if isinstance(v := getattr(cpu, f.name), torch.Tensor)
    }
    return dataclasses.replace(cpu, **moved)


def blocked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    n_prefix: int,
    lay: Layout,
    rel_bias: torch.Tensor,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Attention of a whole sequence: q, k, v (B, nh, n_prefix - 1 + N, hd), the condition prefix
    then the N slots in generation order -> (B, nh, same, hd).

    Prefix tokens attend causally among themselves; slot k attends to every prefix token and to
    the visible positions of its memory block, with ``rel_bias`` (nh, n_rel) added by offset."""
    b, nh, t, hd = q.shape
    p = n_prefix
    n = lay.order.numel()
    if t != p - 1 + n:
        raise ValueError(f"local attention needs the whole sequence: {p - 1 + n} positions, got {t}")
    nb, lq, lm = lay.mem.shape[0], lay.win.query_len, lay.win.memory_len
    ks = torch.cat([k[:, :, p - 1 :], k.new_zeros(b, nh, 1, hd)], 2)  # a zero row for outside
    vs = torch.cat([v[:, :, p - 1 :], v.new_zeros(b, nh, 1, hd)], 2)
    km = ks[:, :, lay.mem.reshape(-1)].view(b, nh, nb, lm, hd)
    vm = vs[:, :, lay.mem.reshape(-1)].view(b, nh, nb, lm, hd)
    kp = k[:, :, None, :p].expand(b, nh, nb, p, hd)
    vp = v[:, :, None, :p].expand(b, nh, nb, p, hd)
    bias = rel_bias[:, lay.rel].to(q.dtype)  # (nh, lq, lm)
    mask = bias[:, None].masked_fill(~lay.allowed[None], float("-inf"))  # (nh, nb, lq, lm)
    mask = torch.cat([mask.new_zeros(nh, nb, lq, p), mask], -1).reshape(nh * nb, lq, p + lm)
    kk = torch.cat([kp, km], 3).reshape(b, nh * nb, p + lm, hd)
    vv = torch.cat([vp, vm], 3).reshape(b, nh * nb, p + lm, hd)
    qq = q[:, :, p - 1 :].reshape(b, nh * nb, lq, hd)
    y = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, dropout_p=dropout_p)
    y = y.reshape(b, nh, n, hd)
    if p == 1:
        return y
    yp = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, : p - 1], k[:, :, : p - 1], v[:, :, : p - 1], dropout_p=dropout_p, is_causal=True
    )
    return torch.cat([yp, y], 2)


class LocalKVCache:
    """Sampling state of a local model, for every layer: one buffer of keys/values holding the
    condition prefix (``[0, P)``), a ring of the grid positions a later query can still see and a
    zero row (outside the grid); ``slot`` is the next slot to feed. Per block it keeps which
    addresses the block reads (``gather``) and their visibility as an additive mask (``visible``);
    per layer the relative bias of each in-block position (``bias``)."""

    def __init__(self, rel_biases, batch: int, head_dim: int, n_prefix: int, lay: Layout, *, device, dtype):
        n_layer, n_head = len(rel_biases), rel_biases[0].shape[0]
        p = n_prefix
        self.kv = torch.zeros(
            n_layer, 2, batch, n_head, p + lay.ring_size + 1, head_dim, device=device, dtype=dtype
        )
        nb = lay.mem.shape[0]
        prefix = torch.arange(p, device=device).expand(nb, p)
        self.gather = torch.cat([prefix, p + lay.mem_addr], 1)  # (nb, P + lm)
        visible = torch.zeros(lay.allowed.shape, device=device, dtype=dtype).masked_fill(
            ~lay.allowed, float("-inf")
        )
        self.visible = torch.cat([visible.new_zeros(*visible.shape[:2], p), visible], 2)  # (nb, lq, P + lm)
        self.bias = [
            torch.cat([b.new_zeros(n_head, lay.win.query_len, p), b[:, lay.rel]], 2).to(dtype)
            for b in rel_biases
        ]  # per layer (nh, lq, P + lm)
        self.layout, self.n_prefix, self.slot = lay, p, 0


def cached_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LocalKVCache, layer: int
) -> torch.Tensor:
    """One slot's attention: q, k, v (B, nh, 1, hd) of slot ``cache.slot`` >= 1 -> (B, nh, 1, hd).
    Writes the slot's key/value into the layer's ring and reads its memory block from there."""
    lay, kv = cache.layout, cache.kv[layer]
    a = cache.n_prefix + lay.addr[cache.slot]
    kv[0, :, :, a] = k[:, :, 0]
    kv[1, :, :, a] = v[:, :, 0]
    blk, i = divmod(cache.slot, lay.win.query_len)
    idx = cache.gather[blk]
    mask = (cache.bias[layer][:, i] + cache.visible[blk, i])[:, None]  # (nh, 1, P + lm)
    return torch.nn.functional.scaled_dot_product_attention(
        q, kv[0][:, :, idx], kv[1][:, :, idx], attn_mask=mask
    )
