"""EDSR (Lim et al., CVPR Workshops 2017), in the baseline size used by quantization papers.

Parameter and buffer names follow sanghyun-son/EDSR-PyTorch (``src/model/edsr.py``), so its released
``edsr_baseline_x{2,3,4}-*.pt`` files (plain state dicts) load unchanged. The pretrained configuration is
``EDSR(scale=s)`` with the defaults below (16 residual blocks, 64 features, residual scale 1). The released
network works on [0, 255]; ``forward`` takes [0, 1] and rescales by ``rgb_range``. No padding is needed.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

TINY_KWARGS: dict[str, int] = {"n_resblocks": 2, "n_feats": 8}
"""Keyword set of the tiny test variant (a few thousand parameters); pass ``scale`` separately."""

DIV2K_RGB_MEAN: tuple[float, float, float] = (0.4488, 0.4371, 0.4040)
"""Per-channel mean of DIV2K (on a [0, 1] scale) that EDSR-PyTorch subtracts from its input."""


def _conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    """Return a stride-1 3x3 convolution with bias and 'same' zero padding."""
    return nn.Conv2d(in_channels, out_channels, 3, padding=1)


class MeanShift(nn.Module):
    """Fixed 1x1 colour transform that adds (sign +1) or subtracts (sign -1) the dataset mean.

    The checkpoint stores it as a convolution's ``weight`` and ``bias``; here they are buffers, so they load
    under the same keys but are neither trained nor mistaken for a layer to quantize.
    """

    weight: torch.Tensor
    bias: torch.Tensor

    def __init__(self, rgb_range: float, sign: int, mean: tuple[float, float, float] = DIV2K_RGB_MEAN) -> None:
        """Build the shift of ``sign * rgb_range * mean`` with identity channel mixing."""
        super().__init__()
        self.register_buffer("weight", torch.eye(3).view(3, 3, 1, 1))
        self.register_buffer("bias", sign * rgb_range * torch.tensor(mean))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the stored 1x1 transform to ``x``."""
        return F.conv2d(x, self.weight, self.bias)


class ResBlock(nn.Module):
    """EDSR residual block without batch norm: conv, ReLU, conv, scaled, plus the input."""

    def __init__(self, n_feats: int, res_scale: float) -> None:
        """Build the block for ``n_feats`` features; ``res_scale`` multiplies the residual branch."""
        super().__init__()
        self.body = nn.Sequential(_conv3x3(n_feats, n_feats), nn.ReLU(), _conv3x3(n_feats, n_feats))
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x`` plus the scaled residual branch."""
        return self.body(x) * self.res_scale + x


def pixel_shuffle_upsampler(scale: int, n_feats: int) -> nn.Sequential:
    """Sub-pixel upsampler of EDSR-PyTorch: (conv to 4x channels, shuffle by 2) per factor 2, or a x3 step."""
    layers: list[nn.Module] = []
    if scale & (scale - 1) == 0:
        for _ in range(int(math.log2(scale))):
            layers += [_conv3x3(n_feats, 4 * n_feats), nn.PixelShuffle(2)]
    elif scale == 3:
        layers += [_conv3x3(n_feats, 9 * n_feats), nn.PixelShuffle(3)]
    else:
        raise ValueError(f"EDSR supports scale 3 or a power of 2, not {scale}")
    return nn.Sequential(*layers)


class EDSR(nn.Module):
    """EDSR super-resolution network: mean shift, conv head, residual body with long skip, sub-pixel tail."""

    def __init__(
        self,
        scale: int,
        n_resblocks: int = 16,
        n_feats: int = 64,
        res_scale: float = 1.0,
        rgb_range: float = 255,
    ) -> None:
        """Build EDSR.

        ``scale`` is the upscaling factor, ``n_resblocks``/``n_feats`` the depth and width (16/64 for the
        baseline, 32/256 with ``res_scale=0.1`` for the full EDSR), ``rgb_range`` the pixel range the network
        was trained on (255 for the released weights; the forward pass scales [0, 1] input to it and back).
        """
        super().__init__()
        self.scale = scale
        self.pad_multiple = 1
        self.rgb_range = rgb_range
        self.stage_names: tuple[str, ...] = tuple(f"body.{i}" for i in range(n_resblocks))
        self.sub_mean = MeanShift(rgb_range, sign=-1)
        self.add_mean = MeanShift(rgb_range, sign=1)
        self.head = nn.Sequential(_conv3x3(3, n_feats))
        self.body = nn.Sequential(
            *(ResBlock(n_feats, res_scale) for _ in range(n_resblocks)), _conv3x3(n_feats, n_feats)
        )
        self.tail = nn.Sequential(pixel_shuffle_upsampler(scale, n_feats), _conv3x3(n_feats, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Super-resolve ``x`` (RGB in [0, 1], [B, 3, H, W]) to [B, 3, scale*H, scale*W] in [0, 1]."""
        shallow = self.head(self.sub_mean(x * self.rgb_range))
        out = self.add_mean(self.tail(self.body(shallow) + shallow))
        return out / self.rgb_range
