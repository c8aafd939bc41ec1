"""Parity with the official DeepLab v2 MSC pipeline (../shared/fixtures/deeplab)."""

from __future__ import annotations

import pytest
import torch

from models.checkpoint import CheckpointError
from models.deeplab import load_deeplab_v2, preprocess, segment
from tests import fixtures

pytestmark = pytest.mark.parity
NAME = "deeplab/deeplabv2_cocostuff164k"
WEIGHTS = "deeplabv2_resnet101_msc-cocostuff164k-100000.pth"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.slow
def test_deeplab_v2_msc_matches_official(releases):
    model = load_deeplab_v2(releases(NAME) / WEIGHTS)
    e = fixtures.expected(NAME)
    image = e["image_uint8"].float() / 127.5 - 1.0
    assert torch.equal(preprocess(image), e["net_input"])
    with torch.no_grad():
        per_scale = model.logits_per_scale(e["net_input"])
        for got, key in zip(per_scale, ("logits_scale_1", "logits_scale_0_5", "logits_scale_0_75")):
            assert _rel(got, e[key]) < 1e-4, key
        x = e["net_input"][:1]
        for name in ("layer1", "layer2", "layer3", "layer4", "layer5"):
            x = getattr(model.base, name)(x)
            s = e["layers_stride"][name]
            assert _rel(x[..., ::s, ::s], e["layers"][name]) < 1e-4, name
        assert _rel(model(e["net_input"]), e["logits"]) < 1e-4
    labels, up = segment(model, image)
    assert _rel(up[..., ::8, ::8], e["logits_up_sub8"]) < 1e-4
    differ = labels != e["labels"][:, 0]
    assert (e["top2_margin"][differ] < 1e-2).all()  # only near-ties may differ
    assert differ.float().mean() < 1e-3


def test_deeplab_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_deeplab_v2(tmp_path / "missing.pth")
    torch.save({"base.layer1.conv1.conv.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="missing keys"):
        load_deeplab_v2(tmp_path / "bad.pth")
    torch.save({"model": {"base.layer1.conv1.conv.weight": torch.zeros(1)}}, tmp_path / "wrapped.pth")
    with pytest.raises(CheckpointError, match="plain state_dict"):  # a format is read as declared
        load_deeplab_v2(tmp_path / "wrapped.pth")
