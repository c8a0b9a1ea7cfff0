"""RDN: residual dense network (Zhang et al., CVPR 2018), as implemented in EDSR-PyTorch.

Parameter names follow sanghyun-son/EDSR-PyTorch ``src/model/rdn.py`` (also used unchanged by the
quantization forks PAMS, DAQ and AdaBM). The pretrained configuration is ``RDN(scale=s)`` with the defaults
below: G0=64 and config 'B' (D=16 blocks of C=8 layers with growth G=64). There is no mean shift; the
network works on [0, 255] and ``forward`` takes [0, 1] and rescales by ``rgb_range``. No padding is needed.
"""

import torch
from torch import nn

TINY_KWARGS: dict[str, int] = {"G0": 8, "D": 2, "C": 2, "G": 4}
"""Keyword set of the tiny test variant (a few thousand parameters); pass ``scale`` separately."""


def _conv(in_channels: int, out_channels: int, kernel_size: int) -> nn.Conv2d:
    """Return a stride-1 convolution with bias and 'same' zero padding."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)


class DenseLayer(nn.Module):
    """One densely connected layer: conv + ReLU, whose output is appended to its input along channels."""

    def __init__(self, in_channels: int, growth: int, kernel_size: int) -> None:
        """Build a layer reading ``in_channels`` features and adding ``growth`` new ones."""
        super().__init__()
        self.conv = nn.Sequential(_conv(in_channels, growth, kernel_size), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x`` concatenated with the layer's new features."""
        return torch.cat((x, self.conv(x)), dim=1)


class RDB(nn.Module):
    """Residual dense block: ``C`` dense layers, 1x1 local feature fusion back to ``G0``, plus the input."""

    def __init__(self, G0: int, G: int, C: int, kernel_size: int) -> None:
        """Build the block on ``G0`` features with ``C`` layers of growth ``G``."""
        super().__init__()
        self.convs = nn.Sequential(*(DenseLayer(G0 + i * G, G, kernel_size) for i in range(C)))
        self.LFF = nn.Conv2d(G0 + C * G, G0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x`` plus the fused dense features."""
        return self.LFF(self.convs(x)) + x


class RDN(nn.Module):
    """RDN super-resolution network: two shallow convs, residual dense blocks with global feature fusion,
    sub-pixel upsampling."""

    def __init__(
        self,
        scale: int,
        G0: int = 64,
        D: int = 16,
        C: int = 8,
        G: int = 64,
        kernel_size: int = 3,
        rgb_range: float = 255,
    ) -> None:
        """Build RDN.

        ``scale`` is the upscaling factor (2, 3 or 4), ``G0`` the feature width, ``D`` the number of residual
        dense blocks, ``C`` the layers per block, ``G`` the growth rate (config 'B' is D/C/G = 16/8/64, 'A'
        20/6/32), ``kernel_size`` the spatial size of the non-1x1 convolutions, ``rgb_range`` the pixel range
        the network was trained on (255 in EDSR-PyTorch; the forward pass scales [0, 1] input to it and back).
        """
        super().__init__()
        if scale not in (2, 3, 4):
            raise ValueError(f"RDN supports scale 2, 3 or 4, not {scale}")
        self.scale = scale
        self.pad_multiple = 1
        self.rgb_range = rgb_range
        self.stage_names: tuple[str, ...] = tuple(f"RDBs.{i}" for i in range(D))
        self.SFENet1 = _conv(3, G0, kernel_size)
        self.SFENet2 = _conv(G0, G0, kernel_size)
        self.RDBs = nn.ModuleList(RDB(G0, G, C, kernel_size) for _ in range(D))
        self.GFF = nn.Sequential(nn.Conv2d(D * G0, G0, 1), _conv(G0, G0, kernel_size))
        steps = [2, 2] if scale == 4 else [scale]
        layers: list[nn.Module] = []
        channels = G0
        for factor in steps:
            layers += [_conv(channels, G * factor * factor, kernel_size), nn.PixelShuffle(factor)]
            channels = G
        self.UPNet = nn.Sequential(*layers, _conv(G, 3, kernel_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Super-resolve ``x`` (RGB in [0, 1], [B, 3, H, W]) to [B, 3, scale*H, scale*W] in [0, 1]."""
        shallow = self.SFENet1(x * self.rgb_range)
        feat = self.SFENet2(shallow)
        block_outputs: list[torch.Tensor] = []
        for block in self.RDBs:
            feat = block(feat)
            block_outputs.append(feat)
        fused = self.GFF(torch.cat(block_outputs, dim=1)) + shallow
        return self.UPNet(fused) / self.rgb_range
