"""The weight-free conditions (Canny edges, block-mean low resolution) and the fidelity figures."""

from __future__ import annotations

import numpy as np
import pytest

from models import conditions as c


def test_canny_outlines_a_square_and_finds_nothing_on_a_flat_image():
    g = np.zeros((2, 32, 32), np.uint8)
    g[0, 8:24, 8:24] = 200
    e = c.canny(g, 50, 150, 1.0)
    assert e[1].max() == 0 and set(np.unique(e[0])) == {0, 255}
    ys, xs = np.nonzero(e[0])
    assert ys.min() >= 6 and ys.max() <= 25 and xs.min() >= 6 and xs.max() <= 25  # on the square's border
    assert e[0, 14:18, 14:18].max() == 0  # not inside it
    assert np.array_equal(e, c.canny(g, 50, 150, 1.0))


def test_to_gray_uses_luma_and_keeps_grey_images():
    x = np.full((1, 3, 2, 2), -1.0, np.float32)
    x[0, 1] = 1.0  # pure green
    assert c.to_gray(x)[0, 0, 0] == round(0.587 * 255)
    assert c.to_gray(np.zeros((1, 1, 2, 2), np.float32))[0, 0, 0] == 128


def test_degrade_is_the_block_mean_at_the_image_size():
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (2, 3, 8, 8), dtype=np.uint8)
    low = c.degrade(u8, 4)
    assert low.shape == u8.shape and low.dtype == np.uint8
    assert low[0, 1, 0, 0] == np.rint(u8[0, 1, :4, :4].mean())
    assert np.array_equal(c.downsample(low, 4), np.rint(c.downsample(u8, 4)))  # idempotent on blocks
    assert np.array_equal(c.degrade(low, 4), low)
    with pytest.raises(ValueError, match="not a multiple"):
        c.downsample(u8, 3)


def test_edge_f1_counts_a_one_pixel_shift_within_tolerance():
    t = np.zeros((1, 16, 16), np.uint8)
    t[0, 8, 2:14] = 255
    shifted = np.roll(t, 1, axis=1)
    assert c.edge_f1(t, t)["f1"] == 1.0
    assert c.edge_f1(shifted, t, tolerance=1)["f1"] == 1.0
    assert c.edge_f1(shifted, t, tolerance=0)["f1"] == 0.0
    half = t.copy()
    half[0, 8, 8:] = 0
    got = c.edge_f1(half, t, tolerance=0)
    assert (
        got["precision"] == 1.0 and got["recall"] == pytest.approx(0.5) and got["f1"] == pytest.approx(2 / 3)
    )
    assert c.edge_f1(np.zeros_like(t), t)["recall"] == 0.0


def test_depth_errors_are_invariant_to_scale_and_shift_of_disparity():
    rng = np.random.default_rng(0)
    gt = rng.uniform(0.5, 2.0, (3, 8, 8))
    exact = c.depth_errors(3.0 * gt - 0.7, gt)
    assert exact["absrel"] == pytest.approx(0.0, abs=1e-9) and exact["delta1"] == 1.0
    noisy = c.depth_errors(rng.uniform(0.5, 2.0, (3, 8, 8)), gt)
    assert noisy["absrel"] > 0.1 and noisy["delta1"] < 0.9


def test_segmentation_scores_by_hand():
    target = np.array([[[0, 0, 1, 1]]])
    pred = np.array([[[0, 1, 1, 1]]])
    got = c.segmentation_scores(pred, target, 3)  # class 2 absent from the targets: not averaged
    assert got["pixel_accuracy"] == 0.75 and got["miou"] == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_mean_pairwise_distance():
    same = [np.zeros((3, 1, 4, 4)), np.ones((2, 1, 4, 4))]
    assert c.mean_pairwise_distance(same) == 0.0
    apart = [np.stack([np.zeros((1, 4, 4)), np.ones((1, 4, 4))])]
    assert c.mean_pairwise_distance(apart) == pytest.approx(1.0)
    assert np.isnan(c.mean_pairwise_distance([np.zeros((1, 1, 4, 4))]))
