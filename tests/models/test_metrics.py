"""PSNR and SSIM (models/metrics.py) pinned against torchmetrics, a well-kept implementation.

Our SSIM is the Gaussian-window SSIM of Wang et al. (11 x 11, sigma 1.5, K1 0.01, K2 0.03) over the
whole image with reflected borders, torchmetrics' definition; scikit-image and the authors' MATLAB
code average over the interior only (a 5-pixel border left out), which gives other numbers on
small images, so figures are comparable only within one definition.
"""

from __future__ import annotations

import pytest
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from models.metrics import psnr, ssim


def _pairs():
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(4, 3, 8, 8, generator=g), size=32, mode="bicubic")
    x = (smooth * 2 - 1).clamp(-1, 1)
    yield "noisy rgb 32", x, (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    yield "blurred rgb 32", x, torch.nn.functional.avg_pool2d(x, 3, 1, 1)
    gray = torch.rand(3, 1, 48, 40, generator=g) * 2 - 1
    yield "gray 48x40", gray, (gray * 0.8 + 0.1).clamp(-1, 1)


@pytest.mark.parametrize("name,x,y", list(_pairs()), ids=lambda v: v if isinstance(v, str) else "")
def test_psnr_and_ssim_match_torchmetrics(name, x, y):
    want_psnr = peak_signal_noise_ratio(y, x, data_range=2.0, reduction="none", dim=(1, 2, 3))
    torch.testing.assert_close(psnr(y, x), want_psnr, atol=1e-4, rtol=0)
    want_ssim = torch.stack(
        [
            structural_similarity_index_measure(y[i : i + 1], x[i : i + 1], data_range=2.0)
            for i in range(len(x))
        ]
    )
    torch.testing.assert_close(ssim(y, x), want_ssim, atol=1e-5, rtol=0)


def test_identical_images():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(ssim(x, x), torch.ones(2))
    assert (psnr(x, x) > 100).all()  # the MSE floor, not inf
