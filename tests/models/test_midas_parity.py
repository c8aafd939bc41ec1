"""Parity with the official MiDaS v2.1 small model and taming's depth pipeline (shared/fixtures/midas)."""

from __future__ import annotations

import json

import pytest
import torch

from models.checkpoint import CheckpointError
from models.midas import TRANSFORMS, MidasSmall, input_size, load_midas, predict_depth, transform
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
    model = load_midas(releases(NAME) / "midas_v21_small_256.pt")
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
    dpt = TRANSFORMS["dpt_hybrid_384"]  # the minimal rule: the scale nearest 1, no upper bound
    assert input_size(480, 640, dpt) == (384, 512) and input_size(600, 1000, dpt) == (384, 640)


# The official transform resizes with cv2 (float32 source positions), ours with torch's bicubic:
# the values differ by at most 2.9e-4 (net-input units); the fixture's README sets this bar.
MAX_DIFF, MEAN_DIFF, MOMENT_ATOL = 5e-4, 1e-5, 1e-5


@pytest.mark.parametrize("model", sorted(TRANSFORMS))
def test_transform_matches_the_official_net_inputs(model):
    """Every model's official net input (size, values, per-channel mean/std) on five image sizes."""
    import numpy as np
    from PIL import Image

    root = fixtures.require("midas/transforms")
    e = torch.load(root / "expected.pt", map_location="cpu", weights_only=True)
    for img in e["images"].split(","):
        rgb = np.array(Image.open(root / e[f"image/{img}/file"]).convert("RGB"))
        assert int(rgb.astype(np.int64).sum()) == e[f"image/{img}/sum"]
        x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 127.5 - 1.0  # as pngs_to_array
        net = transform(x, TRANSFORMS[model])[0]
        assert list(net.shape[1:]) == e[f"{model}/{img}/hw"].tolist(), (model, img)
        diff = (net[:, ::2, ::2] - e[f"{model}/{img}/net_input_s2"]).abs()
        assert diff.max() <= MAX_DIFF and diff.mean() <= MEAN_DIFF, (model, img, float(diff.max()))
        moments = net.double().mean((1, 2)), net.double().std((1, 2), correction=0)
        torch.testing.assert_close(moments[0], e[f"{model}/{img}/mean"], atol=MOMENT_ATOL, rtol=0)
        torch.testing.assert_close(moments[1], e[f"{model}/{img}/std"], atol=MOMENT_ATOL, rtol=0)


def test_midasnet_384_keys_match_the_release():
    from models.midas import MidasNet

    keys = json.loads((fixtures.require("midas/midas_v21_384") / "keys.json").read_text())
    model = MidasNet()
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == keys
    with torch.no_grad():
        y = model.eval()(torch.randn(1, 3, 64, 96))
    assert y.shape == (1, 64, 96) and (y >= 0).all()


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["dpt_hybrid_384", "dpt_large_384"])
def test_dpt_keys_match_the_release(variant, tmp_path):
    from models.dpt import DPTDepth

    keys = json.loads((fixtures.require(f"midas/{variant}") / "keys.json").read_text())
    model = DPTDepth(variant)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == keys
    with torch.no_grad():
        y = model.eval()(torch.randn(1, 3, 64, 96))  # positional embeddings resized to 4x6 patches
    assert y.shape == (1, 64, 96) and (y >= 0).all()
    if variant == "dpt_hybrid_384":  # MiDaS's own file layouts: the state_dict, or it beside the optimizer
        torch.save({"model": model.state_dict(), "optimizer": {}}, tmp_path / "w.pt")
        assert isinstance(load_midas(tmp_path / "w.pt", variant), DPTDepth)
        torch.save({"model": model.state_dict()}, tmp_path / "wrapped.pt")  # not a layout MiDaS reads
        with pytest.raises(CheckpointError, match="plain state_dict"):
            load_midas(tmp_path / "wrapped.pt", variant)
