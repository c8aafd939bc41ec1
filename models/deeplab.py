"""DeepLab v2 (Chen et al., TPAMI 2018): a dilated ResNet-101 with atrous spatial pyramid pooling,
evaluated on multi-scale inputs (MSC). The segmentation model taming's S-FLCKR / COCO-Stuff
conditioning was extracted with (``scripts/extract_segmentation.py``), COCO-Stuff-164k, 182 labels.

State-dict names match kazuto1011/deeplab-pytorch (``base.layer{1..5}``, ``block{i}.reduce/
conv3x3/increase/shortcut.{conv,bn}``, ``base.aspp.c{i}``), so the official
``deeplabv2_resnet101_msc-cocostuff164k-100000.pth`` loads strictly (with or without BatchNorm
``num_batches_tracked``). The stride sits in the first 1x1 conv of a block, which is why
torchvision / timm ResNets cannot load these weights.

``preprocess`` and ``segment`` reproduce the official pipeline: RGB in [-1, 1] -> (x+1)*127.5 ->
BGR -> minus the Caffe mean -> MSC (pixel-wise max over scales 1, 0.5, 0.75) -> logits at 1/8 ->
bilinear upsampling to the image size (align_corners=True) -> argmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

BGR_MEAN = (104.008, 116.669, 122.675)

# COCO-Stuff-164k category names by label id (things 0-90, stuff 91-181; some ids are unused).
COCO_STUFF_LABELS = [
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "street sign",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "hat",
    "backpack",
    "umbrella",
    "shoe",
    "eye glasses",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "plate",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "mirror",
    "dining table",
    "window",
    "desk",
    "toilet",
    "door",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "blender",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
    "hair brush",
    "banner",
    "blanket",
    "branch",
    "bridge",
    "building-other",
    "bush",
    "cabinet",
    "cage",
    "cardboard",
    "carpet",
    "ceiling-other",
    "ceiling-tile",
    "cloth",
    "clothes",
    "clouds",
    "counter",
    "cupboard",
    "curtain",
    "desk-stuff",
    "dirt",
    "door-stuff",
    "fence",
    "floor-marble",
    "floor-other",
    "floor-stone",
    "floor-tile",
    "floor-wood",
    "flower",
    "fog",
    "food-other",
    "fruit",
    "furniture-other",
    "grass",
    "gravel",
    "ground-other",
    "hill",
    "house",
    "leaves",
    "light",
    "mat",
    "metal",
    "mirror-stuff",
    "moss",
    "mountain",
    "mud",
    "napkin",
    "net",
    "paper",
    "pavement",
    "pillow",
    "plant-other",
    "plastic",
    "platform",
    "playingfield",
    "railing",
    "railroad",
    "river",
    "road",
    "rock",
    "roof",
    "rug",
    "salad",
    "sand",
    "sea",
    "shelf",
    "sky-other",
    "skyscraper",
    "snow",
    "solid-other",
    "stairs",
    "stone",
    "straw",
    "structural-other",
    "table",
    "tent",
    "textile-other",
    "towel",
    "tree",
    "vegetable",
    "wall-brick",
    "wall-concrete",
    "wall-other",
    "wall-panel",
    "wall-stone",
    "wall-tile",
    "wall-wood",
    "water-other",
    "waterdrops",
    "window-blind",
    "window-other",
    "wood",
]


@dataclass(frozen=True)
class DeepLabConfig:
    n_classes: int = 182  # COCO-Stuff-164k
    n_blocks: tuple[int, ...] = (3, 4, 23, 3)  # ResNet-101
    atrous_rates: tuple[int, ...] = (6, 12, 18, 24)
    scales: tuple[float, ...] = (0.5, 0.75)  # extra MSC input scales besides 1


class ConvBnReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int, stride: int, pad: int, dilation: int, relu: bool = True):
        super().__init__()
        self.add_module("conv", nn.Conv2d(cin, cout, k, stride, pad, dilation, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout, eps=1e-5, momentum=1 - 0.999))
        if relu:
            self.add_module("relu", nn.ReLU())


class Bottleneck(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, dilation: int, downsample: bool):
        super().__init__()
        mid = cout // 4
        self.reduce = ConvBnReLU(cin, mid, 1, stride, 0, 1)  # the stride is here, in the 1x1 conv
        self.conv3x3 = ConvBnReLU(mid, mid, 3, 1, dilation, dilation)
        self.increase = ConvBnReLU(mid, cout, 1, 1, 0, 1, relu=False)
        self.shortcut = ConvBnReLU(cin, cout, 1, stride, 0, 1, relu=False) if downsample else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.increase(self.conv3x3(self.reduce(x))) + self.shortcut(x))


class ResLayer(nn.Sequential):
    def __init__(self, n: int, cin: int, cout: int, stride: int, dilation: int):
        super().__init__()
        for i in range(n):
            self.add_module(
                f"block{i + 1}",
                Bottleneck(
                    cin if i == 0 else cout, cout, stride if i == 0 else 1, dilation, downsample=i == 0
                ),
            )


class Stem(nn.Sequential):
    def __init__(self, cout: int):
        super().__init__()
        self.add_module("conv1", ConvBnReLU(3, cout, 7, 2, 3, 1))
        self.add_module("pool", nn.MaxPool2d(3, 2, 1, ceil_mode=True))


class ASPP(nn.Module):
    def __init__(self, cin: int, cout: int, rates: tuple[int, ...]):
        super().__init__()
        for i, r in enumerate(rates):
            self.add_module(f"c{i}", nn.Conv2d(cin, cout, 3, 1, padding=r, dilation=r, bias=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(stage(x) for stage in self.children())


class DeepLabV2(nn.Sequential):
    """Output stride 8: layers 4 and 5 dilate (2, 4) instead of striding."""

    def __init__(self, cfg: DeepLabConfig):
        super().__init__()
        ch = [64 * 2**p for p in range(6)]
        self.add_module("layer1", Stem(ch[0]))
        self.add_module("layer2", ResLayer(cfg.n_blocks[0], ch[0], ch[2], 1, 1))
        self.add_module("layer3", ResLayer(cfg.n_blocks[1], ch[2], ch[3], 2, 1))
        self.add_module("layer4", ResLayer(cfg.n_blocks[2], ch[3], ch[4], 1, 2))
        self.add_module("layer5", ResLayer(cfg.n_blocks[3], ch[4], ch[5], 1, 4))
        self.add_module("aspp", ASPP(ch[5], cfg.n_classes, cfg.atrous_rates))


class DeepLabMSC(nn.Module):
    """Multi-scale evaluation: pixel-wise max of the logits at scale 1 and ``cfg.scales``."""

    def __init__(self, cfg: DeepLabConfig | None = None):
        super().__init__()
        self.config = cfg = cfg or DeepLabConfig()
        self.base = DeepLabV2(cfg)

    def logits_per_scale(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = [self.base(x)]
        for s in self.config.scales:
            out.append(self.base(F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)))
        return out  # [(B, K, h, w) at scale 1, then each extra scale at its own size]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Network input (B, 3, H, W) -> fused logits at 1/8 resolution."""
        per_scale = self.logits_per_scale(x)
        h, w = per_scale[0].shape[-2:]
        up = [per_scale[0]] + [
            F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False) for t in per_scale[1:]
        ]
        return torch.stack(up).max(dim=0).values


def preprocess(image: torch.Tensor) -> torch.Tensor:
    """RGB images in [-1, 1] (B, 3, H, W) -> the network input (BGR, 0-255, minus the Caffe mean)."""
    x = (image + 1.0) * 127.5
    x = x.flip(1)  # RGB -> BGR
    return x - torch.tensor(BGR_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)


@torch.no_grad()
def segment(model: DeepLabMSC, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB in [-1, 1] -> (labels (B, H, W) uint8 COCO-Stuff ids, upsampled logits (B, K, H, W))."""
    logits = model(preprocess(image))
    up = F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=True)
    return up.argmax(1).to(torch.uint8), up


# ------------------------------------------------------------------ torchvision DeepLabV3 (second option)


def torchvision_deeplabv3():
    """torchvision's DeepLabV3-ResNet101 (COCO images, 21 Pascal VOC labels), empty weights.

    Load ``DeepLabV3_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1`` into it (``models.checkpoint``).
    """
    from torchvision.models.segmentation import deeplabv3_resnet101

    return deeplabv3_resnet101(weights=None, weights_backbone=None, num_classes=21, aux_loss=True).eval()


def torchvision_deeplabv3_labels() -> list[str]:
    from torchvision.models.segmentation import DeepLabV3_ResNet101_Weights

    return list(DeepLabV3_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1.meta["categories"])


@torch.no_grad()
def segment_v3(model: nn.Module, image: torch.Tensor, resize: int = 520) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's preset (shorter side to 520, bilinear; ImageNet mean/std) -> labels at the image size."""
    x = (image + 1.0) / 2.0
    h, w = x.shape[-2:]
    scale = resize / min(h, w)
    x = F.interpolate(
        x, size=(round(h * scale), round(w * scale)), mode="bilinear", align_corners=False, antialias=True
    )
    mean = torch.tensor((0.485, 0.456, 0.406), dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225), dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    logits = model((x - mean) / std)["out"]
    up = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
    return up.argmax(1).to(torch.uint8), up


def load_deeplab_v2(path, cfg: DeepLabConfig | None = None) -> DeepLabMSC:
    """The official ``deeplabv2_resnet101_msc-cocostuff164k-100000.pth`` (kazuto1011/deeplab-pytorch,
    a plain state_dict), loaded strictly."""
    from models.checkpoint import load_release_state, read_state_dict

    return load_release_state(DeepLabMSC(cfg), read_state_dict(path), f"{path}")


def load_deeplab_v3_torchvision(path) -> nn.Module:
    """torchvision's ``deeplabv3_resnet101_coco-586e9e4e.pth`` (its weights enum's file, a plain
    state_dict), loaded strictly."""
    from models.checkpoint import load_release_state, read_state_dict

    return load_release_state(torchvision_deeplabv3(), read_state_dict(path), f"{path}")
