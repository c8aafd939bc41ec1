"""The smallest VQGAN configs the tests build (f2, 16x16, ch 32, one res block, no attention)."""

from __future__ import annotations

import dataclasses

from models.vqgan import VQGANConfig

TINY_VQGAN = VQGANConfig(
    ch=32,
    ch_mult=(1, 2),
    num_res_blocks=1,
    attn_resolutions=(),
    resolution=16,
    z_channels=8,
    embed_dim=4,
    codebook_size=16,
)


def tiny_vqgan(**changes) -> VQGANConfig:
    """:data:`TINY_VQGAN` with ``changes`` (channels, codebook size, quantizer, ...)."""
    return dataclasses.replace(TINY_VQGAN, **changes)
