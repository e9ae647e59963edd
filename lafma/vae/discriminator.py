"""PatchGAN discriminator (pix2pix), as LDM's autoencoder loss uses it on mel images."""

from __future__ import annotations

from torch import Tensor, nn


def _init_weights(m: nn.Module) -> None:
    # pix2pix / LDM init: conv weights N(0, 0.02), BatchNorm scale N(1, 0.02) and zero shift.
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class NLayerDiscriminator(nn.Module):
    """Fully convolutional discriminator with one real/fake logit per overlapping patch.

    A 4×4 stride-2 conv, ``n_layers - 1`` further stride-2 conv–BatchNorm–LeakyReLU blocks
    (width doubling up to 8 × ndf), one stride-1 block, and a stride-1 conv to one channel.
    Convs followed by BatchNorm have no bias, which BatchNorm's shift would cancel.

    Args:
        input_nc: input image channels (1 for a mel image).
        ndf: width of the first layer.
        n_layers: number of stride-2 convs.
    """

    def __init__(self, input_nc: int = 1, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        kw, padw = 4, 1
        layers: list[nn.Module] = [nn.Conv2d(input_nc, ndf, kw, stride=2, padding=padw),
                                   nn.LeakyReLU(0.2, inplace=True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [nn.Conv2d(ndf * prev, ndf * mult, kw, stride=2, padding=padw, bias=False),
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, inplace=True)]
        prev, mult = mult, min(2**n_layers, 8)
        layers += [nn.Conv2d(ndf * prev, ndf * mult, kw, stride=1, padding=padw, bias=False),
                   nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, inplace=True),
                   nn.Conv2d(ndf * mult, 1, kw, stride=1, padding=padw)]
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, input_nc, T, F) mel image → patch logits (B, 1, T', F').

        With ``n_layers`` = 3, T' = T / 8 - 2 and F' = F / 8 - 2 (for sides divisible by 8).
        """
        return self.main(x)
