"""DPT (Ranftl et al., ICCV 2021): MiDaS v3 depth with a vision-transformer encoder
(``dpt_large_384``: timm ``vit_large_patch16_384``; ``dpt_hybrid_384``: timm
``vit_base_r50_s16_384``), reassembled into a 4-level feature pyramid and fused RefineNet-style.

State-dict names are those of the official release files (``pretrained.model.*`` is the timm ViT,
``pretrained.act_postprocess{1..4}``, ``scratch.*``), checked against the release key manifests.
Positional embeddings are resized bilinearly for inputs other than 384x384, as the official
``forward_flex`` does. Input and output conventions are those of ``models.midas``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.midas import FeatureFusionBlock, Interpolate

VARIANTS = {
    # name: (timm model, hooks, reassembled channels, vit width)
    "dpt_large_384": ("vit_large_patch16_384", (5, 11, 17, 23), (256, 512, 1024, 1024), 1024),
    "dpt_hybrid_384": ("vit_base_r50_s16_384", (0, 1, 8, 11), (256, 512, 768, 768), 768),
}


class ProjectReadout(nn.Module):
    """Fold the class token into every patch token: Linear(2C -> C) + GELU."""

    def __init__(self, width: int):
        super().__init__()
        self.project = nn.Sequential(nn.Linear(2 * width, width), nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x[:, 1:]
        return self.project(torch.cat([tokens, x[:, :1].expand_as(tokens)], -1))  # (B, N, C)


class Transpose(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)


class FusionBlock(FeatureFusionBlock):
    """DPT's fusion block: no expansion, and an explicit output size where the pyramid needs one."""

    def __init__(self, features: int):
        super().__init__(features, nn.ReLU(False), expand=False, align_corners=True)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None, size=None) -> torch.Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        if size is None:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        else:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class DPTDepth(nn.Module):
    def __init__(self, variant: str = "dpt_hybrid_384", features: int = 256):
        super().__init__()
        import timm

        name, hooks, channels, width = VARIANTS[variant]
        self.variant, self.hooks = variant, hooks
        self.hybrid = "r50" in name
        enc = nn.Module()
        enc.model = timm.create_model(name, pretrained=False)
        for i, c in enumerate(channels):
            if self.hybrid and i < 2:  # the ResNet stages' outputs are used as they are
                setattr(
                    enc, f"act_postprocess{i + 1}", nn.Sequential(nn.Identity(), nn.Identity(), nn.Identity())
                )
                continue
            layers = [ProjectReadout(width), Transpose(), nn.Identity(), nn.Conv2d(width, c, 1)]
            if i == 0:
                layers.append(nn.ConvTranspose2d(c, c, 4, stride=4))
            elif i == 1:
                layers.append(nn.ConvTranspose2d(c, c, 2, stride=2))
            elif i == 3:
                layers.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
            setattr(enc, f"act_postprocess{i + 1}", nn.Sequential(*layers))
        self.pretrained = enc
        s = nn.Module()
        for i, c in enumerate(channels, start=1):
            setattr(s, f"layer{i}_rn", nn.Conv2d(c, features, 3, padding=1, bias=False))
        for i in range(1, 5):
            setattr(s, f"refinenet{i}", FusionBlock(features))
        s.output_conv = nn.Sequential(
            nn.Conv2d(features, features // 2, 3, padding=1),
            Interpolate(scale_factor=2, mode="bilinear", align_corners=True),
            nn.Conv2d(features // 2, 32, 3, padding=1),
            nn.ReLU(True),
            nn.Conv2d(32, 1, 1),
            nn.ReLU(True),
            nn.Identity(),
        )
        self.scratch = s

    def _tokens(self, x: torch.Tensor) -> tuple[list[torch.Tensor], tuple[int, int]]:
        """Run the ViT, returning the hooked activations (stage maps or token sequences)."""
        vit = self.pretrained.model
        h, w = x.shape[-2] // 16, x.shape[-1] // 16
        outs: list[torch.Tensor] = []
        if self.hybrid:
            bb = vit.patch_embed.backbone
            y = bb.stem(x)
            for i, stage in enumerate(bb.stages):
                y = stage(y)
                if i < 2:
                    outs.append(y)
            y = bb.norm(y) if hasattr(bb, "norm") else y
            t = vit.patch_embed.proj(y).flatten(2).transpose(1, 2)
        else:
            t = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)
        pos = vit.pos_embed
        grid = pos[0, 1:]
        g = int(math.sqrt(grid.shape[0]))
        grid = F.interpolate(grid.reshape(1, g, g, -1).permute(0, 3, 1, 2), size=(h, w), mode="bilinear")
        pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)], 1)
        t = torch.cat([vit.cls_token.expand(t.shape[0], -1, -1), t], 1) + pos
        for i, blk in enumerate(vit.blocks):
            t = blk(t)
            if i in self.hooks[len(outs) :]:
                outs.append(t)
        return outs, (h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised input (B, 3, H, W), H and W multiples of 32 -> relative inverse depth (B, H, W)."""
        outs, (h, w) = self._tokens(x)
        layers = []
        for i, o in enumerate(outs):
            post = getattr(self.pretrained, f"act_postprocess{i + 1}")
            o = post[0:2](o)
            if o.ndim == 3:
                o = o.unflatten(2, (h, w))
            layers.append(post[3:](o))
        s = self.scratch
        rn = [getattr(s, f"layer{i + 1}_rn")(layer) for i, layer in enumerate(layers)]
        path = s.refinenet4(rn[3], size=rn[2].shape[2:])
        path = s.refinenet3(path, rn[2], size=rn[1].shape[2:])
        path = s.refinenet2(path, rn[1], size=rn[0].shape[2:])
        path = s.refinenet1(path, rn[0])
        return s.output_conv(path).squeeze(1)
