"""Preprocessing models on CPU: images/s batched (as the stages run) vs the official batch-1 loop of
taming's extract scripts (one image per forward), same weights, same run.

- MiDaS v2.1 small (midas_v21_small_256): 320x240 images -> 256x192 network input.
- DeepLab v2 ResNet-101 MSC (COCO-Stuff): 256x256 images, scales 1, 0.5, 0.75.
Random weights (the official release files cannot be downloaded here); speed does not depend on them.
"""

from __future__ import annotations

import os
import time

import torch

from models.deeplab import DeepLabMSC, segment
from models.midas import MidasSmall, predict_depth


def _images_per_s(fn, x: torch.Tensor, batch: int) -> float:
    fn(x[:1])  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(x), batch):
        fn(x[i : i + batch])
    return len(x) / (time.perf_counter() - t0)


def run(quick: bool = False) -> dict:
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    out = {"threads": torch.get_num_threads()}
    midas = MidasSmall().eval()
    n = 8 if quick else 32
    x = torch.rand(n, 3, 240, 320) * 2 - 1

    def depth(b):
        return predict_depth(midas, b)

    one, batched = _images_per_s(depth, x, 1), _images_per_s(depth, x, 16)
    out["midas_small_240x320"] = {
        "images": n,
        "batch1_images_per_s": round(one, 2),
        "batched16_images_per_s": round(batched, 2),
        "ratio": round(batched / one, 2),
    }
    deeplab = DeepLabMSC().eval()
    n = 4 if quick else 8
    x = torch.rand(n, 3, 256, 256) * 2 - 1

    def seg(b):
        return segment(deeplab, b)

    one, batched = _images_per_s(seg, x, 1), _images_per_s(seg, x, 8)
    out["deeplab_v2_msc_256"] = {
        "images": n,
        "batch1_images_per_s": round(one, 2),
        "batched8_images_per_s": round(batched, 2),
        "ratio": round(batched / one, 2),
    }
    print(out)
    return out
