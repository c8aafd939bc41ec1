"""The logged pictures: cells enlarged by a whole factor (pixels stay square), rows named, columns
captioned."""

from __future__ import annotations

import numpy as np
import torch

from infra import previews


def test_framed_enlarges_by_a_whole_factor_and_labels():
    rng = np.random.default_rng(0)
    cells = [rng.integers(0, 255, (32, 32), dtype=np.uint8) for _ in range(6)]
    plain = previews.framed(cells, 3)
    # 32 px -> 96 px cells (factor 3), 3-px gaps: 3 * 96 + 4 * 3 wide, 2 * 96 + 3 * 3 high
    assert plain.shape == (2 * 96 + 3 * 3, 3 * 96 + 4 * 3) and plain.dtype == np.uint8
    assert np.array_equal(plain[3 : 3 + 96 : 3, 3 : 3 + 96 : 3], cells[0])  # nearest neighbour
    named = previews.framed(cells, 3, row_labels=["T-shirt/top", "Trouser"], col_labels=["a", "b", "c"])
    assert named.shape[0] == plain.shape[0] + 22 and named.shape[1] > plain.shape[1] + 40
    assert named.shape[2] == 3
    assert (named[:22] < 128).any()  # captions drawn on top
    assert (named[22:, :40] < 128).any()  # row names drawn on the left


def test_reconstructions_and_real_beside_generated_are_captioned():
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    grid = previews.reconstructions(x, x.flip(0), ncol=4)
    assert grid.shape[1] == 4 * 96 + 5 * 6 and grid.shape[0] == 22 + 2 * 96 + 3 * 6  # 4 pairs in 2 rows
    u8 = ((x + 1) * 127.5).round().to(torch.uint8)
    y = torch.tensor([0, 1, 0, 1])
    g = previews.real_beside_generated(u8, y, u8, y, 2, per=2, names=["cat", "dog"])
    assert g.shape[0] == 22 + 2 * 96 + 3 * 6 and g.ndim == 3


def test_a_caption_spanning_columns_is_centred_over_them():
    cells = [np.zeros((32, 32), np.uint8)] * 8
    g = previews.framed(cells, 8, col_labels=[("real", 4), ("generated", 4)])
    ink = np.flatnonzero((g[:22, :, 0] < 128).any(axis=0))  # caption pixels' columns
    half = g.shape[1] // 2
    left, right = ink[ink < half], ink[ink >= half]
    # each caption's centre within a few px of its half's centre (4 cells of 96 px, 3-px gaps)
    assert abs((left.min() + left.max()) / 2 - half / 2) < 6
    assert abs((right.min() + right.max()) / 2 - 3 * half / 2) < 6
