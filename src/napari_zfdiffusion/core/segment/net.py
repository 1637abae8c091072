"""The segmentation network: a residual U-Net (diffusers ``ModelMixin``, so safetensors only).

Residual blocks with batch normalisation, strided-convolution downsampling, nearest upsampling and
skip connections. Batch norm (not group norm) so that in inference every output pixel depends only
on its neighbourhood: tiles give the whole-image result.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from torch.nn import functional as F

from ..errors import UserInputError

# Widths per resolution level. ``tiny`` is for tests; ``small`` trains on a CPU; ``base`` on a GPU.
SEG_SIZES: dict[str, dict] = {
    "tiny": dict(channels=(8, 16), blocks=1),
    "small": dict(channels=(16, 32, 64, 128), blocks=1),
    "base": dict(channels=(32, 64, 128, 256), blocks=2),
}


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.silu(h + self.skip(x))


class ResUNet(ModelMixin, ConfigMixin):
    """Residual U-Net: (B, in_channels, H, W) -> (B, out_channels, H, W) logits, any H and W.

    Inputs whose sides are not multiples of 2**(levels - 1) are padded by reflection and the output
    cropped back.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, in_channels: int = 1, out_channels: int = 2, channels: tuple[int, ...] = (16, 32, 64, 128),
                 blocks: int = 1):
        super().__init__()
        ch = list(channels)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, ch[0], 3, padding=1, bias=False), nn.BatchNorm2d(ch[0]),
                                  nn.SiLU())
        self.down = nn.ModuleList()
        self.pool = nn.ModuleList()
        for i, c in enumerate(ch):
            self.down.append(nn.Sequential(*[ResBlock(c, c) for _ in range(blocks)]))
            if i < len(ch) - 1:
                self.pool.append(nn.Sequential(nn.Conv2d(c, ch[i + 1], 3, stride=2, padding=1, bias=False),
                                               nn.BatchNorm2d(ch[i + 1]), nn.SiLU()))
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for i in range(len(ch) - 2, -1, -1):
            self.up.append(nn.Conv2d(ch[i + 1], ch[i], 1, bias=False))
            self.merge.append(nn.Sequential(ResBlock(2 * ch[i], ch[i]),
                                            *[ResBlock(ch[i], ch[i]) for _ in range(blocks - 1)]))
        self.head = nn.Conv2d(ch[0], out_channels, 1)

    @property
    def multiple(self) -> int:
        return 2 ** (len(self.config.channels) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = self.multiple
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="reflect" if ph < h and pw < w else "replicate")
        x = self.stem(x)
        skips = []
        for i, block in enumerate(self.down):
            x = block(x)
            if i < len(self.pool):
                skips.append(x)
                x = self.pool[i](x)
        for up, merge in zip(self.up, self.merge):
            skip = skips.pop()
            x = up(F.interpolate(x, size=skip.shape[-2:], mode="nearest"))
            x = merge(torch.cat([x, skip], dim=1))
        return self.head(x)[..., :h, :w]


def build_segmenter(size: str = "small", out_channels: int = 2) -> ResUNet:
    if size not in SEG_SIZES:
        raise UserInputError(f"unknown model size '{size}': choose one of {', '.join(SEG_SIZES)}.")
    return ResUNet(in_channels=1, out_channels=out_channels, **SEG_SIZES[size])


__all__ = ["SEG_SIZES", "ResBlock", "ResUNet", "build_segmenter"]
