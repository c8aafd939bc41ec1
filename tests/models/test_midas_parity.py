"""Parity with the official MiDaS v2.1 small model and taming's depth pipeline (shared/fixtures/midas)."""

from __future__ import annotations

import json

import pytest
import torch

from models.checkpoint import load_midas_small
from models.midas import MidasSmall, input_size, predict_depth, transform
from tests import fixtures

pytestmark = pytest.mark.parity
NAME = "midas/midas_v21_small_256"
RTOL = 1e-4


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def test_state_dict_keys_match_the_release():
    keys = json.loads((fixtures.require(NAME) / "keys.json").read_text())
    own = {k: list(v.shape) for k, v in MidasSmall().state_dict().items()}
    assert own == keys


def test_midas_small_matches_official(releases):
    model = load_midas_small(releases(NAME) / "midas_v21_small_256.pt")
    e = fixtures.expected(NAME)
    with torch.no_grad():
        feats = model.features(e["x"][:1])
        for k, v in e["feats"].items():
            s = e["feats_stride"][k]
            assert _rel(feats[k][..., ::s, ::s], v) < RTOL, k
        pre_relu = model.scratch.output_conv[:5](model.features(e["x"])["path1"])
        assert _rel(pre_relu, e["pre_relu"]) < RTOL
        assert _rel(model(e["x"]), e["y"]) < RTOL
        image = e["image_uint8"].permute(0, 3, 1, 2).float() / 127.5 - 1.0  # taming's [-1, 1] RGB
        net_input = transform(image)
        assert net_input.shape == e["net_input"].shape and _rel(net_input, e["net_input"]) < RTOL
        assert _rel(model(e["net_input"]), e["prediction"]) < RTOL
    assert _rel(predict_depth(model, image), e["prediction_resized"]) < RTOL


def test_input_size_rule():
    assert input_size(240, 320) == (192, 256)  # keep aspect, upper bound 256, multiple of 32
    assert input_size(256, 256) == (256, 256)
    assert input_size(1000, 100) == (256, 32)


def test_midasnet_384_keys_match_the_release():
    from models.midas import MidasNet

    keys = json.loads((fixtures.require("midas/midas_v21_384") / "keys.json").read_text())
    model = MidasNet()
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == keys
    with torch.no_grad():
        y = model.eval()(torch.randn(1, 3, 64, 96))
    assert y.shape == (1, 64, 96) and (y >= 0).all()


@pytest.mark.parametrize("variant", ["dpt_hybrid_384", "dpt_large_384"])
def test_dpt_keys_match_the_release(variant, tmp_path):
    from models.checkpoint import load_midas
    from models.dpt import DPTDepth

    keys = json.loads((fixtures.require(f"midas/{variant}") / "keys.json").read_text())
    model = DPTDepth(variant)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == keys
    with torch.no_grad():
        y = model.eval()(torch.randn(1, 3, 64, 96))  # positional embeddings resized to 4x6 patches
    assert y.shape == (1, 64, 96) and (y >= 0).all()
    if variant == "dpt_hybrid_384":  # the strict loader accepts the release layout ({"model": ...} too)
        torch.save({"model": model.state_dict()}, tmp_path / "w.pt")
        assert isinstance(load_midas(tmp_path / "w.pt", variant), DPTDepth)
