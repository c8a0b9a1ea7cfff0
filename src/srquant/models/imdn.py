"""IMDN: information multi-distillation network (Hui et al., ACM MM 2019).

Identity modules named ``*_glue`` mark the tensors between layers (activation outputs, the concatenation,
the attention gate, the block output); they hold no parameters and let a quantizer be put on those tensors
without changing this file.

Parameter names follow the released checkpoints of Zheng222/IMDN (``IMDN_x{2,3,4}.pth``, stored with a
``module.`` prefix that the registry strips). The pretrained configuration is ``IMDN(scale=s)`` with the
defaults below (64 features, 6 blocks); the network takes RGB in [0, 1] and needs no padding.
"""

import torch
from torch import nn

TINY_KWARGS: dict[str, int] = {"features": 8, "num_blocks": 2, "attention_reduction": 4}
"""Keyword set of the tiny test variant (a few thousand parameters); pass ``scale`` separately."""


def _conv(in_channels: int, out_channels: int, kernel_size: int) -> nn.Conv2d:
    """Return a stride-1 convolution with 'same' zero padding, the only conv kind IMDN uses."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)


class ContrastChannelAttention(nn.Module):
    """Contrast-aware channel attention: gates channels by their spatial std plus mean."""

    def __init__(self, channels: int, reduction: int) -> None:
        """Build the gating MLP; ``channels`` is the gated width, ``reduction`` its bottleneck ratio."""
        super().__init__()
        self.conv_du = nn.Sequential(
            nn.Conv2d(channels, channels // reduction, 1),
            nn.ReLU(),
            nn.Conv2d(channels // reduction, channels, 1),
            nn.Sigmoid(),
        )
        self.gate_glue = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scale each channel of ``x`` by a weight computed from its contrast and mean."""
        mean = x.mean(dim=(2, 3), keepdim=True)
        std = (x - mean).pow(2).mean(dim=(2, 3), keepdim=True).sqrt()
        return x * self.gate_glue(self.conv_du(std + mean))


class IMDBlock(nn.Module):
    """Information multi-distillation block: three distillation steps, attention, 1x1 fusion, skip."""

    def __init__(self, channels: int, attention_reduction: int) -> None:
        """Build the block for ``channels`` features; a quarter of them is distilled at each step."""
        super().__init__()
        self.distilled = channels // 4
        self.remaining = channels - self.distilled
        self.c1 = _conv(channels, channels, 3)
        self.c2 = _conv(self.remaining, channels, 3)
        self.c3 = _conv(self.remaining, channels, 3)
        self.c4 = _conv(self.remaining, self.distilled, 3)
        self.act = nn.LeakyReLU(0.05)
        self.c5 = _conv(channels, channels, 1)
        self.cca = ContrastChannelAttention(self.distilled * 4, attention_reduction)
        self.act1_glue, self.act2_glue, self.act3_glue = nn.Identity(), nn.Identity(), nn.Identity()
        self.cat_glue = nn.Identity()
        self.out_glue = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Distill features progressively, gate them by attention, fuse, and add the block input."""
        kept: list[torch.Tensor] = []
        rest = x
        for conv, glue in ((self.c1, self.act1_glue), (self.c2, self.act2_glue), (self.c3, self.act3_glue)):
            head, rest = torch.split(glue(self.act(conv(rest))), (self.distilled, self.remaining), dim=1)
            kept.append(head)
        kept.append(self.c4(rest))
        return self.out_glue(self.c5(self.cca(self.cat_glue(torch.cat(kept, dim=1)))) + x)


class IMDN(nn.Module):
    """IMDN super-resolution network: IMD blocks, dense aggregation, global skip and pixel-shuffle."""

    def __init__(
        self,
        scale: int,
        in_channels: int = 3,
        out_channels: int = 3,
        features: int = 64,
        num_blocks: int = 6,
        attention_reduction: int = 16,
    ) -> None:
        """Build IMDN.

        ``scale`` is the upscaling factor, ``features`` the width (a multiple of 4, as the blocks distil a
        quarter of it per step), ``num_blocks`` the number of IMD blocks, ``attention_reduction`` the
        bottleneck ratio of the channel attention (16 in the released models).
        """
        super().__init__()
        if features % 4 or features // attention_reduction < 1:
            raise ValueError(f"features={features} must be a multiple of 4 and >= attention_reduction")
        self.scale = scale
        self.pad_multiple = 1
        self.stage_names: tuple[str, ...] = tuple(f"IMDB{i}" for i in range(1, num_blocks + 1))
        self.fea_conv = _conv(in_channels, features, 3)
        for name in self.stage_names:
            self.add_module(name, IMDBlock(features, attention_reduction))
        self.c = nn.Sequential(_conv(features * num_blocks, features, 1), nn.LeakyReLU(0.05))
        self.LR_conv = _conv(features, features, 3)
        self.upsampler = nn.Sequential(_conv(features, out_channels * scale**2, 3), nn.PixelShuffle(scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Super-resolve ``x`` (RGB in [0, 1], [B, 3, H, W]) to [B, 3, scale*H, scale*W]."""
        shallow = self.fea_conv(x)
        outputs: list[torch.Tensor] = []
        feat = shallow
        for name in self.stage_names:
            feat = getattr(self, name)(feat)
            outputs.append(feat)
        fused = self.LR_conv(self.c(torch.cat(outputs, dim=1))) + shallow
        return self.upsampler(fused)
