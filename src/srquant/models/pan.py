"""PAN: pixel attention network (Zhao et al., ECCV Workshops 2020).

Identity modules named ``*_glue`` mark the tensors between layers that no single convolution reads (branch
activations, sigmoid gates, gated products, block and stage outputs); they hold no parameters and let a
quantizer be put on those tensors without changing this file.

Parameter names follow the released checkpoints of zhaohengyuan1/PAN (``PANx{2,3,4}_DF2K.pth``, a plain
state dict). The pretrained configuration is ``PAN(3, 3, nf=40, unf=24, nb=16, scale=s)``, which are also the
defaults below; the network takes RGB in [0, 1] and needs no padding.
"""

import torch
import torch.nn.functional as F
from torch import nn

TINY_KWARGS: dict[str, int] = {"nf": 8, "unf": 4, "nb": 2}
"""Keyword set of the tiny test variant (a few thousand parameters); pass ``scale`` separately."""


def _conv3x3(in_channels: int, out_channels: int, bias: bool = True) -> nn.Conv2d:
    """Return a stride-1 3x3 convolution with 'same' zero padding."""
    return nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias)


class PixelAttention(nn.Module):
    """Pixel attention: a 1x1 convolution and a sigmoid give a per-pixel, per-channel gate for the input."""

    def __init__(self, channels: int) -> None:
        """Build the gate for ``channels`` features."""
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)
        self.gate_glue = nn.Identity()

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """The sigmoid gate of ``x``: values in (0, 1), one per pixel and channel."""
        return self.gate_glue(torch.sigmoid(self.conv(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x`` multiplied by its sigmoid gate."""
        return x * self.gate(x)


class PAConv(nn.Module):
    """Attention branch of SCPA: a 3x3 convolution gated by a pixel-attention map, then another 3x3."""

    def __init__(self, channels: int) -> None:
        """Build the branch for ``channels`` features; the two 3x3 convolutions have no bias, as released."""
        super().__init__()
        self.k2 = nn.Conv2d(channels, channels, 1)
        self.k3 = _conv3x3(channels, channels, bias=False)
        self.k4 = _conv3x3(channels, channels, bias=False)
        self.gate_glue = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Gate the 3x3 response of ``x`` by the sigmoid of its 1x1 response, then convolve again."""
        return self.k4(self.k3(x) * self.gate_glue(torch.sigmoid(self.k2(x))))


class SCPA(nn.Module):
    """Self-calibrated block with pixel attention: a plain and an attention branch on halves, fused by 1x1."""

    def __init__(self, channels: int) -> None:
        """Build the block for ``channels`` features (even: each branch gets half)."""
        super().__init__()
        half = channels // 2
        self.conv1_a = nn.Conv2d(channels, half, 1, bias=False)
        self.conv1_b = nn.Conv2d(channels, half, 1, bias=False)
        self.k1 = nn.Sequential(_conv3x3(half, half, bias=False))
        self.PAConv = PAConv(half)
        self.conv3 = nn.Conv2d(2 * half, channels, 1, bias=False)
        self.act = nn.LeakyReLU(0.2)
        self.plain_glue, self.branch_glue, self.attended_glue = nn.Identity(), nn.Identity(), nn.Identity()
        self.out_glue = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run both branches on ``x``, concatenate, fuse and add the block input."""
        plain = self.plain_glue(self.act(self.k1(self.act(self.conv1_a(x)))))
        attended = self.attended_glue(self.act(self.PAConv(self.branch_glue(self.act(self.conv1_b(x))))))
        return self.out_glue(self.conv3(torch.cat((plain, attended), dim=1)) + x)


class PAN(nn.Module):
    """PAN super-resolution network: SCPA trunk, nearest-neighbour upsampling with pixel attention, and a
    bilinear image skip."""

    def __init__(
        self, in_nc: int = 3, out_nc: int = 3, nf: int = 40, unf: int = 24, nb: int = 16, scale: int = 4
    ) -> None:
        """Build PAN.

        ``in_nc``/``out_nc`` are the image channels, ``nf`` the trunk width (even), ``unf`` the width of the
        upsampling stages, ``nb`` the number of SCPA blocks and ``scale`` the factor (2, 3 or 4; x4 uses two
        x2 stages, the others one stage).
        """
        super().__init__()
        if scale not in (2, 3, 4):
            raise ValueError(f"PAN supports scale 2, 3 or 4, not {scale}")
        if nf % 2:
            raise ValueError(f"nf={nf} must be even (SCPA splits it in two branches)")
        self.scale = scale
        self.pad_multiple = 1
        self.stage_names: tuple[str, ...] = tuple(f"SCPA_trunk.{i}" for i in range(nb))
        self.conv_first = _conv3x3(in_nc, nf)
        self.SCPA_trunk = nn.Sequential(*(SCPA(nf) for _ in range(nb)))
        self.trunk_conv = _conv3x3(nf, nf)
        self.upconv1 = _conv3x3(nf, unf)
        self.att1 = PixelAttention(unf)
        self.HRconv1 = _conv3x3(unf, unf)
        if scale == 4:
            self.upconv2 = _conv3x3(unf, unf)
            self.att2 = PixelAttention(unf)
            self.HRconv2 = _conv3x3(unf, unf)
        self.conv_last = _conv3x3(unf, out_nc)
        self.act = nn.LeakyReLU(0.2)
        self.trunk_glue = nn.Identity()
        self.up1_act_glue, self.up2_act_glue = nn.Identity(), nn.Identity()
        self.up1_glue, self.up2_glue = nn.Identity(), nn.Identity()

    def _upsample(self, x: torch.Tensor, factor: int, stage: int) -> torch.Tensor:
        """One upsampling stage: nearest-neighbour enlargement, convolution, pixel attention, convolution.

        The released network computes act(x * gate); this computes act(x) * gate, the same function because
        the sigmoid gate is positive and LeakyReLU is positively homogeneous. The order matters for integer
        inference: the product's negative tail is five times shorter after the activation, so its 8-bit grid
        is finer, and both the activation and the product run as uint8 kernels.
        """
        upconv, att, hrconv = (getattr(self, f"{part}{stage}") for part in ("upconv", "att", "HRconv"))
        act_glue, glue = getattr(self, f"up{stage}_act_glue"), getattr(self, f"up{stage}_glue")
        x = upconv(F.interpolate(x, scale_factor=factor, mode="nearest"))
        return glue(self.act(hrconv(act_glue(self.act(x)) * att.gate(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Super-resolve ``x`` (RGB in [0, 1], [B, 3, H, W]) to [B, 3, scale*H, scale*W]."""
        shallow = self.conv_first(x)
        feat = self.trunk_glue(shallow + self.trunk_conv(self.SCPA_trunk(shallow)))
        if self.scale == 4:
            feat = self._upsample(feat, 2, stage=1)
            feat = self._upsample(feat, 2, stage=2)
        else:
            feat = self._upsample(feat, self.scale, stage=1)
        skip = F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)
        return self.conv_last(feat) + skip
