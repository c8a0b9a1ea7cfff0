"""CARN-M: the mobile cascading residual network (Ahn et al., ECCV 2018).

Parameter names follow nmhkahn/CARN-pytorch's ``carn_m.pth``: one multi-scale checkpoint holding the x2, x3
and x4 upsamplers plus the mean-shift 1x1 convolutions (stored as frozen parameters). The pretrained
configuration is ``CARNM(scale=s)`` with the defaults below (64 features, group 4); every instance builds all
three upsamplers so that the one file loads strictly, and ``forward`` uses the one for ``self.scale``.
The network takes RGB in [0, 1] and needs no padding.

Identity modules named ``*_glue`` mark the residual sums and the concatenations that are concatenated again;
they hold no parameters and let a quantizer be put on those tensors without changing this file.
"""

import torch
from torch import nn

SCALES: tuple[int, ...] = (2, 3, 4)
"""Upscaling factors the multi-scale network has an upsampler for."""

RGB_MEAN: tuple[float, float, float] = (0.4488, 0.4371, 0.4040)
"""DIV2K RGB mean that the network subtracts from its input and adds back to its output."""

TINY_KWARGS: dict[str, int] = {"features": 8, "group": 4}
"""Keyword set of the tiny test variant (a few thousand parameters); pass ``scale`` separately."""


class MeanShift(nn.Module):
    """Frozen identity 1x1 convolution adding ``sign * RGB_MEAN``, kept as a conv to match the checkpoint."""

    def __init__(self, sign: float) -> None:
        """Build the shift; ``sign`` is -1 to subtract the mean and +1 to add it back."""
        super().__init__()
        self.shifter = nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.shifter.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            self.shifter.bias.copy_(sign * torch.tensor(RGB_MEAN))
        self.shifter.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Shift ``x`` channel-wise by the mean."""
        return self.shifter(x)


class ConvReLU(nn.Module):
    """A convolution followed by ReLU, under ``body`` to match the checkpoint's names."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        """Build a stride-1 'same'-padded ``kernel_size`` conv from ``in_channels`` to ``out_channels``."""
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2), nn.ReLU()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply conv then ReLU."""
        return self.body(x)


class EfficientResidual(nn.Module):
    """Efficient residual unit: two grouped 3x3 convs, a pointwise conv, skip connection, ReLU."""

    def __init__(self, channels: int, group: int) -> None:
        """Build the unit for ``channels`` features with ``group`` groups in the 3x3 convolutions."""
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, groups=group),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, groups=group),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 1),
        )
        self.act = nn.ReLU()
        self.sum_glue = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ReLU(body(x) + x)."""
        return self.act(self.sum_glue(self.body(x) + x))


def _cascade(x: torch.Tensor, units: list[nn.Module], fusers: list[nn.Module], glues: list[nn.Module]) -> torch.Tensor:
    """Run the CARN cascade: each unit's output joins all earlier features, which a 1x1 fuser compresses.

    ``glues`` tap the concatenations that the next step concatenates again (all but the last).
    """
    gathered = x
    out = x
    for step, (unit, fuse) in enumerate(zip(units, fusers, strict=True)):
        gathered = torch.cat([gathered, unit(out)], dim=1)
        if step < len(glues):
            gathered = glues[step](gathered)
        out = fuse(gathered)
    return out


class CascadingBlock(nn.Module):
    """Local cascading block of CARN-M: one efficient residual unit shared by three cascade steps."""

    def __init__(self, channels: int, group: int) -> None:
        """Build the block; the residual unit ``b1`` is reused (weight sharing is what makes CARN-M small)."""
        super().__init__()
        self.b1 = EfficientResidual(channels, group)
        self.c1 = ConvReLU(channels * 2, channels, 1)
        self.c2 = ConvReLU(channels * 3, channels, 1)
        self.c3 = ConvReLU(channels * 4, channels, 1)
        self.cat1_glue, self.cat2_glue = nn.Identity(), nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Cascade the shared residual unit three times with growing concatenations."""
        return _cascade(x, [self.b1, self.b1, self.b1], [self.c1, self.c2, self.c3], [self.cat1_glue, self.cat2_glue])


class ShuffleUpsampler(nn.Module):
    """Upsampler of one scale: grouped conv, ReLU, pixel-shuffle; once for x3, once per factor 2 else."""

    def __init__(self, channels: int, scale: int, group: int) -> None:
        """Build the stages for ``scale`` in (2, 3, 4) on ``channels`` features."""
        super().__init__()
        factors = [3] if scale == 3 else [2] * (scale // 2)
        layers: list[nn.Module] = []
        for factor in factors:
            layers += [
                nn.Conv2d(channels, channels * factor**2, 3, padding=1, groups=group),
                nn.ReLU(),
                nn.PixelShuffle(factor),
            ]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Upsample the features ``x`` by this block's scale."""
        return self.body(x)


class CARNM(nn.Module):
    """Multi-scale CARN-M network; ``forward`` super-resolves by ``self.scale``."""

    def __init__(self, scale: int, features: int = 64, group: int = 4) -> None:
        """Build CARN-M.

        ``scale`` (2, 3 or 4) is the factor ``forward`` uses; upsamplers for all of them exist so that the
        multi-scale checkpoint loads strictly. ``features`` is the width and ``group`` the number of groups
        of the efficient residual and upsampling convolutions (4 in the released CARN-M).
        """
        super().__init__()
        if scale not in SCALES:
            raise ValueError(f"CARN-M supports scales {SCALES}, got {scale}")
        self.scale = scale
        self.pad_multiple = 1
        self.stage_names: tuple[str, ...] = ("b1", "b2", "b3")
        self.sub_mean = MeanShift(-1.0)
        self.add_mean = MeanShift(1.0)
        self.entry = nn.Conv2d(3, features, 3, padding=1)
        self.b1 = CascadingBlock(features, group)
        self.b2 = CascadingBlock(features, group)
        self.b3 = CascadingBlock(features, group)
        self.c1 = ConvReLU(features * 2, features, 1)
        self.c2 = ConvReLU(features * 3, features, 1)
        self.c3 = ConvReLU(features * 4, features, 1)
        self.upsample = nn.ModuleDict({f"up{s}": ShuffleUpsampler(features, s, group) for s in SCALES})
        self.exit = nn.Conv2d(features, 3, 3, padding=1)
        self.cat1_glue, self.cat2_glue = nn.Identity(), nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Super-resolve ``x`` (RGB in [0, 1], [B, 3, H, W]) to [B, 3, scale*H, scale*W]."""
        feat = self.entry(self.sub_mean(x))
        feat = _cascade(
            feat, [self.b1, self.b2, self.b3], [self.c1, self.c2, self.c3], [self.cat1_glue, self.cat2_glue]
        )
        feat = self.upsample[f"up{self.scale}"](feat)
        return self.add_mean(self.exit(feat))
