"""SRResNet (Ledig et al., CVPR 2017) as used by the dynamic-quantization papers CADyQ, AdaBM and Granular-DQ.

Parameter names follow Cheeun/AdaBM ``src/model/srresnet.py`` (an EDSR-PyTorch fork, whose full-precision
starting point is ``bnsrresnet_x{s}.pt``; CADyQ and Granular-DQ use the same names). As in those files,
each residual block is conv-BN-PReLU-conv-BN, every convolution is bias-free, the body ends with conv + BN,
head and tail convolutions are 9x9, and each sub-pixel step is followed by a PReLU. There is no mean shift
(CADyQ and Granular-DQ build unused ``sub_mean``/``add_mean`` layers, whose keys their files may carry and a
loader drops). The pretrained configuration is ``SRResNet(scale=s)`` with the defaults below. The network
works on [0, 255]; ``forward`` takes [0, 1] and rescales by ``rgb_range``. No padding is needed.
"""

import math

import torch
from torch import nn

TINY_KWARGS: dict[str, int] = {"n_resblocks": 2, "n_feats": 4}
"""Keyword set of the tiny test variant (a few thousand parameters); pass ``scale`` separately."""


def _conv(in_channels: int, out_channels: int, kernel_size: int) -> nn.Conv2d:
    """Return a bias-free stride-1 convolution with 'same' zero padding (SRResNet uses no conv bias)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)


class ResBlock(nn.Module):
    """SRResNet residual block: conv, batch norm, PReLU, conv, batch norm, plus the input."""

    def __init__(self, n_feats: int) -> None:
        """Build the block for ``n_feats`` features, with its own single-slope PReLU."""
        super().__init__()
        self.conv1 = _conv(n_feats, n_feats, 3)
        self.conv2 = _conv(n_feats, n_feats, 3)
        self.act = nn.PReLU()
        self.bn1 = nn.BatchNorm2d(n_feats)
        self.bn2 = nn.BatchNorm2d(n_feats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x`` plus the residual branch."""
        return self.bn2(self.conv2(self.act(self.bn1(self.conv1(x))))) + x


def prelu_upsampler(scale: int, n_feats: int) -> nn.Sequential:
    """Sub-pixel upsampler: (conv, pixel shuffle, PReLU) per factor 2, or one such x3 step."""
    if scale & (scale - 1) == 0:
        steps = [2] * int(math.log2(scale))
    elif scale == 3:
        steps = [3]
    else:
        raise ValueError(f"SRResNet supports scale 3 or a power of 2, not {scale}")
    layers: list[nn.Module] = []
    for factor in steps:
        layers += [_conv(n_feats, factor * factor * n_feats, 3), nn.PixelShuffle(factor), nn.PReLU()]
    return nn.Sequential(*layers)


class SRResNet(nn.Module):
    """SRResNet super-resolution network: 9x9 head, batch-normed residual body with a long skip, sub-pixel
    tail with PReLU, 9x9 output convolution."""

    def __init__(self, scale: int, n_resblocks: int = 16, n_feats: int = 64, rgb_range: float = 255) -> None:
        """Build SRResNet.

        ``scale`` is the upscaling factor, ``n_resblocks``/``n_feats`` the depth and width (16/64 in the
        papers), ``rgb_range`` the pixel range the network was trained on (255 in the EDSR-PyTorch forks; the
        forward pass scales [0, 1] input to it and back).
        """
        super().__init__()
        self.scale = scale
        self.pad_multiple = 1
        self.rgb_range = rgb_range
        self.stage_names: tuple[str, ...] = tuple(f"body.{i}" for i in range(n_resblocks))
        self.head = nn.Sequential(_conv(3, n_feats, 9), nn.PReLU())
        blocks = [ResBlock(n_feats) for _ in range(n_resblocks)]
        self.body = nn.Sequential(*blocks, _conv(n_feats, n_feats, 3), nn.BatchNorm2d(n_feats))
        self.tail = nn.Sequential(prelu_upsampler(scale, n_feats), _conv(n_feats, 3, 9))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Super-resolve ``x`` (RGB in [0, 1], [B, 3, H, W]) to [B, 3, scale*H, scale*W] in [0, 1]."""
        shallow = self.head(x * self.rgb_range)
        return self.tail(self.body(shallow) + shallow) / self.rgb_range
