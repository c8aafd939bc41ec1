"""PatchGAN discriminator (Isola et al. 2017, pix2pix), as used by taming's VQGAN loss.

State-dict names match taming's ``NLayerDiscriminator`` (``main.{i}``), so the ``loss.discriminator.*``
weights of official checkpoints load strictly.
"""

from __future__ import annotations

from torch import nn


def weights_init(m: nn.Module) -> None:
    """The official initialisation: N(0, 0.02) convs, N(1, 0.02) BatchNorm scales, zero shifts."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.constant_(m.bias, 0)


class NLayerDiscriminator(nn.Module):
    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, True),
        ]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last hidden layer keeps the resolution
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))  # one logit per patch
        self.main = nn.Sequential(*layers)
        self.apply(weights_init)

    def forward(self, x):
        return self.main(x)  # (B, 1, h', w') patch logits
