"""ESWT: Efficient Striped Window Transformer (Shi et al., 2023) for lightweight super-resolution.

Each self-attention layer predicts a query and a value (no separate key: the affinity is ``q @ q^T``,
unscaled) with a 1x1 conv plus batch norm, splits them by channel into one branch per striped window shape
(24x6 and 6x24 for the released model), attends inside each window and fuses the branches with a 1x1 conv.
Every second layer cyclically rolls its windows (no attention mask, so the roll wraps around the image). The
feed-forward part uses "shift" 1x1 convs, which move fifths of the channels by one pixel before mixing them.

Parameter names follow ``Fried-Rice-Lab/FriedRiceLab`` (``archs/eswt_arch.py`` and ``archs/utils/``), so the
released checkpoint (sub-dict ``params``) loads unchanged. The released model is
``ESWT(scale=4, n_t=6, n_g=3, dim=60, num_heads=1, window_list=((24, 6), (6, 24)),
shift_list=((12, 3), (3, 12)))`` and works on RGB in [0, 255].
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from srquant.models.padding import reflect_pad_to

TINY_KWARGS: dict[str, object] = {
    "n_t": 2,
    "n_g": 1,
    "dim": 10,
    "num_heads": 1,
    "window_list": ((4, 2), (2, 4)),
    "shift_list": ((2, 1), (1, 2)),
}
"""Small configuration (a few thousand parameters, same code path) for tests; pass ``scale`` separately."""

DF2K_RGB_MEAN = (0.4690, 0.4490, 0.4036)
"""Mean RGB of DF2K on a [0, 1] scale, removed before and restored after the network."""


class MeanShift(nn.Module):
    """Fixed per-channel affine map (a frozen 1x1 conv) that removes or restores the dataset mean colour.

    A plain module rather than an ``nn.Conv2d``, so that quantizers do not mistake it for a learned layer.
    """

    def __init__(self, img_range: float, sign: int) -> None:
        """img_range: pixel scale the network runs on (255); sign: -1 subtracts the mean, +1 adds it back."""
        super().__init__()
        self.weight = nn.Parameter(torch.eye(3).view(3, 3, 1, 1), requires_grad=False)
        self.bias = nn.Parameter(sign * img_range * torch.tensor(DF2K_RGB_MEAN), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the frozen 1x1 conv."""
        return F.conv2d(x, self.weight, self.bias)


class ShiftConv2d1x1(nn.Conv2d):
    """1x1 conv preceded by a fixed one-pixel shift: each fifth of the input channels reads its right, left,
    lower, upper or own pixel, via a depth-wise 3x3 conv with the frozen 0/1 kernel ``mask`` (zero border).

    Quantizers must run this module's own ``forward`` (the shift is not part of a plain conv).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        """in_channels: input width (a multiple of 5); out_channels: output width."""
        super().__init__(in_channels, out_channels, kernel_size=1)
        if in_channels % 5:
            raise ValueError(f"ShiftConv2d1x1 needs in_channels divisible by 5, got {in_channels}")
        group = in_channels // 5
        mask = torch.zeros(in_channels, 1, 3, 3)
        # kernel tap (row, col) that each fifth of the channels reads from
        for index, (row, col) in enumerate(((1, 2), (1, 0), (2, 1), (0, 1))):
            mask[index * group : (index + 1) * group, 0, row, col] = 1.0
        mask[4 * group :, 0, 1, 1] = 1.0
        self.mask = nn.Parameter(mask, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Shift channel groups by one pixel, then mix channels with the 1x1 conv."""
        shifted = F.conv2d(x, self.mask, padding=1, groups=self.in_channels)
        return self._conv_forward(shifted, self.weight, self.bias)


class StripedWindowAttention(nn.Module):
    """One branch of the striped-window self-attention: windows of one shape, optionally rolled.

    Holds no parameters; its identity hooks (contract rule 5) see this branch's query, key (= query), value
    and softmax map, once per forward.
    """

    def __init__(self, window: tuple[int, int], shift: tuple[int, int], num_heads: int) -> None:
        """window: (height, width) of the stripes; shift: cyclic roll (rows, cols), (0, 0) for none;
        num_heads: attention heads sharing this branch's channels."""
        super().__init__()
        self.window = (int(window[0]), int(window[1]))
        self.shift = (int(shift[0]), int(shift[1]))
        self.num_heads = num_heads
        self.q_hook = nn.Identity()
        self.k_hook = nn.Identity()
        self.v_hook = nn.Identity()
        self.attn_hook = nn.Identity()

    def forward(self, qv: torch.Tensor) -> torch.Tensor:
        """Attend within windows of ``qv`` ([B, 2C, H, W], query then value channels) -> [B, C, H, W]."""
        batch, channels2, height, width = qv.shape
        win_h, win_w = self.window
        heads = self.num_heads
        head_dim = channels2 // (2 * heads)

        qv = reflect_pad_to(qv, win_h, win_w)
        if self.shift != (0, 0):
            qv = torch.roll(qv, shifts=self.shift, dims=(2, 3))
        padded_h, padded_w = qv.shape[-2:]
        rows, cols = padded_h // win_h, padded_w // win_w

        # [B, (2 heads c), (rows win_h), (cols win_w)] -> [2, (B heads rows cols), (win_h win_w), c]
        tokens = qv.view(batch, 2, heads, head_dim, rows, win_h, cols, win_w)
        tokens = tokens.permute(1, 0, 2, 4, 6, 5, 7, 3).reshape(2, -1, win_h * win_w, head_dim)
        q, v = tokens[0], tokens[1]

        # the original uses the query as its own key and no 1/sqrt(d) scaling
        query = self.q_hook(q)
        key = self.k_hook(q)
        attn = self.attn_hook(torch.softmax(query @ key.transpose(-2, -1), dim=-1))
        out = attn @ self.v_hook(v)

        out = out.view(batch, heads, rows, cols, win_h, win_w, head_dim).permute(0, 1, 6, 2, 4, 3, 5)
        out = out.reshape(batch, heads * head_dim, padded_h, padded_w)
        if self.shift != (0, 0):
            out = torch.roll(out, shifts=(-self.shift[0], -self.shift[1]), dims=(2, 3))
        return out[:, :, :height, :width]


class StripedSelfAttention(nn.Module):
    """Self-attention layer: 1x1 conv + batch norm to query/value, one striped-window branch per window shape
    (each on its own slice of channels), 1x1 conv fusing the branches."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_list: tuple[tuple[int, int], ...],
        shift_list: tuple[tuple[int, int], ...] | None,
    ) -> None:
        """dim: width; num_heads: heads per branch; window_list: window shapes, one branch each;
        shift_list: roll per branch, or None for an unshifted layer."""
        super().__init__()
        if shift_list is None:
            shift_list = ((0, 0),) * len(window_list)
        if len(shift_list) != len(window_list):
            raise ValueError("shift_list needs one shift per window in window_list")
        if dim % (len(window_list) * num_heads):
            raise ValueError(f"dim={dim} must be divisible by len(window_list)*num_heads")
        self.attn = nn.Sequential(nn.Conv2d(dim, dim * 2, 1), nn.BatchNorm2d(dim * 2))
        self.proj = nn.Sequential(nn.Conv2d(dim, dim, 1))
        self.branches = nn.ModuleList(
            StripedWindowAttention(window, shift, num_heads)
            for window, shift in zip(window_list, shift_list, strict=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over ``x`` ([B, dim, H, W]) and return the fused branch outputs, same shape."""
        qv = self.attn(x)
        slices = qv.split(qv.shape[1] // len(self.branches), dim=1)
        outputs = [branch(part) for branch, part in zip(self.branches, slices, strict=True)]
        return self.proj(torch.cat(outputs, dim=1))


class MLP4D(nn.Module):
    """Feed-forward part: shift-conv expand, Swish (SiLU), shift-conv reduce."""

    def __init__(self, dim: int, hidden: int) -> None:
        """dim: input/output width; hidden: expanded width (both multiples of 5)."""
        super().__init__()
        self.fc1 = ShiftConv2d1x1(dim, hidden)
        self.act = nn.SiLU()
        self.fc2 = ShiftConv2d1x1(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Expand, activate, reduce."""
        return self.fc2(self.act(self.fc1(x)))


class TransformerGroup(nn.Module):
    """``n_t`` residual (attention, feed-forward) pairs, every second one shifted, then a 3x3 conv."""

    def __init__(
        self,
        n_t: int,
        dim: int,
        num_heads: int,
        window_list: tuple[tuple[int, int], ...],
        shift_list: tuple[tuple[int, int], ...],
        mlp_ratio: int = 2,
    ) -> None:
        """n_t: attention/feed-forward pairs; dim, num_heads, window_list, shift_list: see
        StripedSelfAttention (odd-numbered layers use shift_list); mlp_ratio: feed-forward expansion."""
        super().__init__()
        # layers 1, 3, 5, ... are the shifted ones
        self.sa_list = nn.ModuleList(
            StripedSelfAttention(dim, num_heads, window_list, shift_list if index % 2 else None) for index in range(n_t)
        )
        self.mlp_list = nn.ModuleList(MLP4D(dim, dim * mlp_ratio) for _ in range(n_t))
        self.conv = nn.Sequential(nn.Conv2d(dim, dim, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the residual pairs, then the closing conv (no group-level skip, as in the original)."""
        for attention, mlp in zip(self.sa_list, self.mlp_list, strict=True):
            x = x + attention(x)
            x = x + mlp(x)
        return self.conv(x)


class ESWT(nn.Module):
    """ESWT super-resolution network: mean shift, 3x3 head, ``n_g`` transformer groups with a long skip,
    pixel-shuffle tail, mean restore."""

    def __init__(
        self,
        scale: int = 4,
        num_in_ch: int = 3,
        num_out_ch: int = 3,
        task: str = "lsr",
        n_t: int = 6,
        n_g: int = 3,
        dim: int = 60,
        num_heads: int = 1,
        window_list: tuple[tuple[int, int], ...] = ((24, 6), (6, 24)),
        shift_list: tuple[tuple[int, int], ...] = ((12, 3), (3, 12)),
        img_range: float = 255.0,
    ) -> None:
        """scale: upscaling factor; num_in_ch, num_out_ch: image channels (3, RGB: the mean shift is RGB);
        task: upsampler kind, only "lsr" (one conv + pixel shuffle, the released model) is supported;
        n_t: attention/feed-forward pairs per group; n_g: groups; dim: width (a multiple of 5 and of
        len(window_list)*num_heads); num_heads: heads per window branch; window_list: striped window shapes;
        shift_list: rolls of the shifted layers; img_range: pixel scale the network was trained on (255), the
        [0, 1] input is multiplied by it and the output divided by it."""
        super().__init__()
        if task != "lsr":
            raise ValueError(f"ESWT supports task='lsr' (lightweight upsampler) only, got {task!r}")
        if num_in_ch != 3 or num_out_ch != 3:
            raise ValueError("ESWT's mean shift is defined for RGB: num_in_ch and num_out_ch must be 3")
        self.scale = scale
        self.img_range = img_range
        # windows never need padding on tiles that are multiples of every window side
        self.pad_multiple = math.lcm(*(side for window in window_list for side in window))

        self.sub_mean = MeanShift(img_range, sign=-1)
        self.add_mean = MeanShift(img_range, sign=1)
        self.head = nn.Sequential(nn.Conv2d(num_in_ch, dim, 3, 1, 1))
        self.body = nn.Sequential(*(TransformerGroup(n_t, dim, num_heads, window_list, shift_list) for _ in range(n_g)))
        self.tail = nn.Sequential(nn.Conv2d(dim, num_out_ch * scale**2, 3, 1, 1), nn.PixelShuffle(scale))
        self.stage_names: tuple[str, ...] = tuple(f"body.{i}" for i in range(n_g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Upscale RGB ``x`` in [0, 1] ([B, 3, H, W]) to [B, 3, scale*H, scale*W] on the same scale.

        As in the original, there is no input padding: each attention branch reflect-pads its own input
        (bottom/right) to its window shape and crops the result back.
        """
        feat = self.head(self.sub_mean(x * self.img_range))
        feat = self.body(feat) + feat
        return self.add_mean(self.tail(feat)) / self.img_range
