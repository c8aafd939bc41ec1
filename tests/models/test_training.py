"""The VQGAN training step (models.vqgan_training) in-process: schedule, objectives, EMA, state
round trips."""

from __future__ import annotations

import copy

import pytest
import torch

from models.losses import VQGANLoss, VQGANLossConfig
from models.optim import Schedule
from models.quantize import QuantizerConfig
from models.vqgan import VQGAN
from models.vqgan_training import (
    VQGANRecipe,
    VQGANTrainer,
    center_crop,
    evaluate,
    hflip_,
    one_hot,
    random_crop,
)
from tests.tiny import tiny_vqgan


def _trainer(channels=1, objective="image", **kw):
    torch.manual_seed(0)
    l2 = QuantizerConfig(l2_norm=True, legacy_loss=False)
    model = VQGAN(tiny_vqgan(in_channels=channels, out_channels=channels, quantizer=l2))
    loss = None
    if objective == "image":
        cfg = VQGANLossConfig(
            perceptual_weight=0.0,
            disc_start=kw.pop("disc_start", 3),
            disc_num_layers=1,
            disc_in_channels=channels,
            disc_ndf=8,
        )
        loss = VQGANLoss(cfg)
    recipe = VQGANRecipe(lr=1e-3, warmup_steps=0, cosine_decay=False, **kw)
    return VQGANTrainer(model, loss, recipe, 20, objective=objective)


def test_schedule_warmup_cosine_floor():
    s = Schedule(lr=1.0, steps=110, warmup_steps=10, cosine_decay=True, floor=0.1)
    assert s(0) == pytest.approx(0.1) and s(9) == pytest.approx(1.0)
    assert s(10) == pytest.approx(1.0) and s(60) == pytest.approx(0.55) and s(110) == pytest.approx(0.1)
    assert s(500) == pytest.approx(0.1)
    assert Schedule(lr=2.0, steps=5)(3) == 2.0  # constant without warm-up and decay


def test_image_steps_reduce_the_loss_and_switch_on_the_discriminator():
    t = _trainer(ema_decay=0.9)
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    first, _ = t.train_step(x)
    assert "disc_loss" not in first and first["g_loss"] == 0.0  # before disc_start: no GAN work
    logs = [t.train_step(x)[0] for _ in range(7)]
    assert "disc_loss" in logs[-1] and logs[-1]["d_weight"] > 0
    assert logs[-1]["rec_loss"] < first["rec_loss"]
    assert t.step == 8 and 0 < logs[-1]["codebook_usage"] <= 1
    # the EMA model differs from the trained one and is what final_model returns
    final = t.final_model()
    w = "decoder.conv_out.weight"
    assert not torch.equal(final.state_dict()[w], t.model.state_dict()[w])
    torch.testing.assert_close(final.state_dict()[w], t.ema[w])


def test_state_round_trip_continues_identically():
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    a = _trainer(ema_decay=0.9, disc_start=2)
    for _ in range(3):
        a.train_step(x)
    state = copy.deepcopy(a.state_dict())  # as torch.save + torch.load would
    b = _trainer(ema_decay=0.9, disc_start=2)
    b.load_state_dict(state)
    assert b.step == 3
    la, _ = a.train_step(x)
    lb, _ = b.train_step(x)
    assert la == lb
    for k, v in a.model.state_dict().items():
        torch.testing.assert_close(v, b.model.state_dict()[k], rtol=0, atol=0, msg=k)


def test_segmentation_objective_is_bce_with_quant():
    t = _trainer(channels=5, objective="bce")
    labels = torch.randint(0, 5, (3, 16, 16))
    x = one_hot(labels, 5)
    assert x.shape == (3, 5, 16, 16) and torch.equal(x.argmax(1), labels)
    logs0, logits = t.train_step(x)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, x)
    assert logs0["bce_loss"] == pytest.approx(float(bce), rel=1e-5)
    assert logs0["total_loss"] == pytest.approx(logs0["bce_loss"] + logs0["quant_loss"], rel=1e-5)
    for _ in range(10):
        logs, _ = t.train_step(x)
    assert logs["bce_loss"] < logs0["bce_loss"] and t.opt_d is None
    m = evaluate(t.final_model(), x, 16, labels=labels)
    assert 0 <= m["pixel_accuracy"] <= 1 and m["images"] == 3
    with pytest.raises(ValueError, match="does not fit 5 segmentation classes"):
        one_hot(torch.full((1, 4, 4), 5), 5)


def test_evaluate_images():
    t = _trainer()
    x = torch.rand(5, 1, 16, 16) * 2 - 1
    m = evaluate(t.final_model(), x, 16, batch=2)
    assert set(m) == {"psnr", "ssim", "codebook_usage", "images"} and m["images"] == 5
    assert m["psnr"] > 0 and -1 <= m["ssim"] <= 1 and 0 < m["codebook_usage"] <= 1


def test_augmentations():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).reshape(2, 1, 6, 6)
    c = random_crop(x, 4, g)
    assert c.shape == (2, 1, 4, 4)
    for i in range(2):  # every crop is a window of its own image
        assert any(torch.equal(c[i], x[i, :, r : r + 4, q : q + 4]) for r in range(3) for q in range(3))
    assert torch.equal(center_crop(x, 4), x[..., 1:5, 1:5])
    assert random_crop(x, 6, g) is x
    flipped = hflip_(x.repeat(16, 1, 1, 1), g)
    same = [torch.equal(f, x[i % 2]) for i, f in enumerate(flipped)]
    mirrored = [torch.equal(f, x[i % 2].flip(-1)) for i, f in enumerate(flipped)]
    assert all(a or b for a, b in zip(same, mirrored)) and any(same) and any(mirrored)


@pytest.mark.slow
def test_evaluate_with_lpips_on_grey_images(tmp_path):
    """LPIPS in validation (grey images shown to it as RGB), from a VGG16 trunk file."""
    import torchvision

    from models.losses import LPIPS

    torch.manual_seed(0)
    torch.save(torchvision.models.vgg16(weights=None).state_dict(), tmp_path / "vgg16.pth")
    lpips = LPIPS(tmp_path / "vgg16.pth")
    t = _trainer()
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    m = evaluate(t.final_model(), x, 16, lpips=lpips)
    assert m["lpips"] > 0 and set(m) == {"psnr", "ssim", "lpips", "codebook_usage", "images"}
    assert float(lpips(x, x).max()) == 0.0
