"""MiDaS monocular depth (Ranftl et al., TPAMI 2022): the depth conditioning of the paper's D-RIN
models (taming ``scripts/extract_depth.py``).

``MidasSmall`` is the official ``MidasNet_small`` (``midas_v21_small_256``): an EfficientNet-Lite3
encoder (timm's ``tf_efficientnet_lite3``, the same keys and features as the official
gen-efficientnet model, regrouped into ``pretrained.layer1..4``), RefineNet-style fusion blocks
and a small head, with the official state-dict names so the release file loads strictly.
``transform`` is the official input transform of each model (:data:`TRANSFORMS`: keep aspect,
multiple of 32, bicubic; MiDaS v2.1 with the ``upper_bound`` rule and ImageNet mean/std, DPT with
the ``minimal`` rule and mean = std = 0.5) and ``predict_depth`` the taming pipeline: relative
inverse depth, bicubically resized back to the image size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ResidualConvUnit(nn.Module):
    def __init__(self, features: int, activation: nn.Module):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1, bias=True)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1, bias=True)
        self.activation = activation  # MidasNet_small: ReLU(inplace=False), so the skip adds x itself

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.activation(self.conv1(self.activation(x)))) + x


class FeatureFusionBlock(nn.Module):
    def __init__(self, features: int, activation: nn.Module, expand: bool, align_corners: bool = True):
        super().__init__()
        self.resConfUnit1 = ResidualConvUnit(features, activation)
        self.resConfUnit2 = ResidualConvUnit(features, activation)
        self.out_conv = nn.Conv2d(features, features // 2 if expand else features, 1, bias=True)
        self.align_corners = align_corners

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=self.align_corners)
        return self.out_conv(x)


class Interpolate(nn.Module):
    def __init__(self, scale_factor: float, mode: str, align_corners: bool = False):
        super().__init__()
        self.scale_factor, self.mode, self.align_corners = scale_factor, mode, align_corners

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(
            x, scale_factor=self.scale_factor, mode=self.mode, align_corners=self.align_corners
        )


def _efficientnet_lite3_encoder() -> nn.Module:
    import timm

    net = timm.create_model("tf_efficientnet_lite3", pretrained=False)
    enc = nn.Module()
    # official grouping: (conv_stem, bn1, act1, blocks 0-1), (block 2), (blocks 3-4), (blocks 5-6);
    # timm's bn1 includes the activation, so index 2 is an Identity to keep the official numbering
    enc.layer1 = nn.Sequential(net.conv_stem, net.bn1, nn.Identity(), *net.blocks[0:2])
    enc.layer2 = nn.Sequential(*net.blocks[2:3])
    enc.layer3 = nn.Sequential(*net.blocks[3:5])
    enc.layer4 = nn.Sequential(*net.blocks[5:9])
    return enc


class MidasSmall(nn.Module):
    """midas_v21_small_256: 4 encoder levels (32, 48, 136, 384 channels) -> inverse depth (B, H, W)."""

    def __init__(self, features: int = 64):
        super().__init__()
        self.pretrained = _efficientnet_lite3_encoder()
        s = nn.Module()
        widths, outs = (32, 48, 136, 384), (features, features * 2, features * 4, features * 8)
        for i, (cin, cout) in enumerate(zip(widths, outs), start=1):
            setattr(s, f"layer{i}_rn", nn.Conv2d(cin, cout, 3, padding=1, bias=False))
        s.activation = nn.ReLU(False)
        s.refinenet4 = FeatureFusionBlock(outs[3], s.activation, expand=True)
        s.refinenet3 = FeatureFusionBlock(outs[2], s.activation, expand=True)
        s.refinenet2 = FeatureFusionBlock(outs[1], s.activation, expand=True)
        s.refinenet1 = FeatureFusionBlock(outs[0], s.activation, expand=False)
        s.output_conv = nn.Sequential(
            nn.Conv2d(features, features // 2, 3, padding=1),
            Interpolate(scale_factor=2, mode="bilinear"),
            nn.Conv2d(features // 2, 32, 3, padding=1),
            s.activation,
            nn.Conv2d(32, 1, 1),
            nn.ReLU(True),  # non-negative inverse depth
            nn.Identity(),
        )
        self.scratch = s

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        p, s = self.pretrained, self.scratch
        f = {"enc1": p.layer1(x)}
        f["enc2"] = p.layer2(f["enc1"])
        f["enc3"] = p.layer3(f["enc2"])
        f["enc4"] = p.layer4(f["enc3"])
        for i in range(1, 5):
            f[f"rn{i}"] = getattr(s, f"layer{i}_rn")(f[f"enc{i}"])
        f["path4"] = s.refinenet4(f["rn4"])
        f["path3"] = s.refinenet3(f["path4"], f["rn3"])
        f["path2"] = s.refinenet2(f["path3"], f["rn2"])
        f["path1"] = s.refinenet1(f["path2"], f["rn1"])
        return f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised input (B, 3, H, W), H and W multiples of 32 -> relative inverse depth (B, H, W)."""
        return self.scratch.output_conv(self.features(x)["path1"]).squeeze(1)


class ResidualConvUnitInplace(nn.Module):
    """MidasNet's residual unit: its ReLU is in place, so the skip adds relu(x), not x."""

    def __init__(self, features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1, bias=True)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(x)
        return self.conv2(F.relu(self.conv1(x))) + x


class FeatureFusionBlockPlain(nn.Module):
    def __init__(self, features: int):
        super().__init__()
        self.resConfUnit1 = ResidualConvUnitInplace(features)
        self.resConfUnit2 = ResidualConvUnitInplace(features)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        return F.interpolate(self.resConfUnit2(x), scale_factor=2, mode="bilinear", align_corners=True)


class MidasNet(nn.Module):
    """midas_v21_384 (taming's "MiDaS v2.0" depth): ResNeXt-101 32x8d encoder, 256-wide decoder."""

    def __init__(self, features: int = 256):
        super().__init__()
        import torchvision

        net = torchvision.models.resnext101_32x8d(weights=None)
        enc = nn.Module()
        enc.layer1 = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1)
        enc.layer2, enc.layer3, enc.layer4 = net.layer2, net.layer3, net.layer4
        self.pretrained = enc
        s = nn.Module()
        for i, cin in enumerate((256, 512, 1024, 2048), start=1):
            setattr(s, f"layer{i}_rn", nn.Conv2d(cin, features, 3, padding=1, bias=False))
        for i in range(1, 5):
            setattr(s, f"refinenet{i}", FeatureFusionBlockPlain(features))
        s.output_conv = nn.Sequential(
            nn.Conv2d(features, 128, 3, padding=1),
            Interpolate(scale_factor=2, mode="bilinear"),
            nn.Conv2d(128, 32, 3, padding=1),
            nn.ReLU(True),
            nn.Conv2d(32, 1, 1),
            nn.ReLU(True),
        )
        self.scratch = s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, s = self.pretrained, self.scratch
        l1 = p.layer1(x)
        l2 = p.layer2(l1)
        l3 = p.layer3(l2)
        l4 = p.layer4(l3)
        path = s.refinenet4(s.layer4_rn(l4))
        path = s.refinenet3(path, s.layer3_rn(l3))
        path = s.refinenet2(path, s.layer2_rn(l2))
        path = s.refinenet1(path, s.layer1_rn(l1))
        return s.output_conv(path).squeeze(1)


@dataclass(frozen=True)
class TransformSpec:
    """The official input transform of one MiDaS/DPT model (isl-org/MiDaS ``model_loader.py``)."""

    size: int  # net_w = net_h
    resize: Literal["upper_bound", "minimal"]  # upper_bound: fit inside size x size; minimal: scale nearest 1
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


TRANSFORMS = {
    "midas_v21_small_256": TransformSpec(256, "upper_bound", IMAGENET_MEAN, IMAGENET_STD),
    "midas_v21_384": TransformSpec(384, "upper_bound", IMAGENET_MEAN, IMAGENET_STD),
    "dpt_hybrid_384": TransformSpec(384, "minimal", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "dpt_large_384": TransformSpec(384, "minimal", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
SMALL = TRANSFORMS["midas_v21_small_256"]


def input_size(h: int, w: int, spec: TransformSpec = SMALL, multiple: int = 32) -> tuple[int, int]:
    """The official ``Resize(keep_aspect_ratio=True, ensure_multiple_of=32)`` size rule.

    Both sides use one scale: ``upper_bound`` the smaller of ``size/h`` and ``size/w`` (the image
    fits inside size x size; a side rounding above ``size`` is floored instead), ``minimal`` the one
    closer to 1 (no bound: 600x1000 becomes 384x640). Sides round to a multiple of 32, half to even.
    """
    scale_h, scale_w = spec.size / h, spec.size / w
    if spec.resize == "upper_bound":
        scale = min(scale_h, scale_w)
    else:
        scale = scale_w if abs(1 - scale_w) < abs(1 - scale_h) else scale_h

    def constrain(x: float) -> int:
        y = int(round(x / multiple) * multiple)  # round(): half to even, as numpy's
        if spec.resize == "upper_bound" and y > spec.size:
            y = int(math.floor(x / multiple) * multiple)
        return max(y, multiple)

    return constrain(scale * h), constrain(scale * w)


def transform(image: torch.Tensor, spec: TransformSpec = SMALL) -> torch.Tensor:
    """RGB in [-1, 1] (B, 3, H, W) -> the network input of ``spec``'s model: resized bicubically
    (align_corners=False, no antialiasing: cv2's INTER_CUBIC), then ``(x - mean) / std``. Matches the
    official transform to max |diff| < 5e-4 (cv2 computes its source positions in float32)."""
    x = (image + 1.0) / 2.0  # the official pipeline feeds img/255 from (image+1)*127.5
    h, w = input_size(*x.shape[-2:], spec=spec)
    x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False)
    mean = torch.tensor(spec.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def predict_depth(model: nn.Module, image: torch.Tensor, spec: TransformSpec = SMALL) -> torch.Tensor:
    """RGB in [-1, 1] (B, 3, H, W) -> relative inverse depth at the image size (B, H, W), as taming."""
    pred = model(transform(image, spec))
    return F.interpolate(pred[:, None], size=image.shape[-2:], mode="bicubic", align_corners=False)[:, 0]


MIDAS_MODELS = ("midas_v21_small_256", "midas_v21_384", "dpt_hybrid_384", "dpt_large_384")


def build(name: str) -> nn.Module:
    """The architecture of the MiDaS release ``name`` (random weights)."""
    from models.dpt import DPTDepth  # DPT builds on this file's fusion blocks

    if name == "midas_v21_small_256":
        return MidasSmall()
    if name == "midas_v21_384":
        return MidasNet()
    if name in ("dpt_hybrid_384", "dpt_large_384"):
        return DPTDepth(name)
    raise ValueError(f"unknown MiDaS model {name!r}; supported: {list(MIDAS_MODELS)}")


def load_midas(path, name: str = "midas_v21_small_256") -> nn.Module:
    """An official MiDaS release file, loaded strictly. Its format is MiDaS's own
    (``BaseModel.load``): a state_dict, or, in a file that also holds the optimizer, the state_dict
    under ``model``."""
    from models.checkpoint import load_release_state, read_state_dict

    model = build(name)
    state = read_state_dict(path)
    if isinstance(state, dict) and "optimizer" in state:
        state = state["model"]
    return load_release_state(model, state, f"{path}")
