"""LMLT: Low-to-high Multi-Level Vision Transformer (Kim et al., 2024) for lightweight super-resolution.

The network splits the channels into ``n_levels`` groups; group ``i`` is max-pooled by ``2**i`` and runs
non-overlapping window self-attention, and coarser levels are upsampled and added into the next finer one
before its attention (low-to-high). Parameter names follow ``jwgdmkj/LMLT`` (``basicsr/archs/lmlt_arch.py``),
so the released checkpoints (sub-dict ``params``) load unchanged. The Tiny model is
``LMLT(dim=36, n_blocks=8, ffn_scale=2.0, scale=s)``.
"""

import torch
import torch.nn.functional as F
from torch import nn

from srquant.models.padding import reflect_pad_to

TINY_KWARGS: dict[str, int | float] = {"dim": 8, "n_blocks": 2, "ffn_scale": 1.0}
"""Small configuration (a few thousand parameters, same code path) for tests; pass ``scale`` separately."""


class ChannelsFirstLayerNorm(nn.Module):
    """Layer normalisation over the channel axis of an NCHW tensor (the original's channels-first form)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        """channels: feature width C; eps: variance floor, 1e-6 as in the original."""
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise each pixel's channel vector, then apply the per-channel affine map."""
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class WindowAttention(nn.Module):
    """Single-head self-attention in non-overlapping square windows plus a depth-wise-conv positional term."""

    def __init__(self, dim: int, window_size: int = 8) -> None:
        """dim: channels of this level; window_size: side of the square attention windows."""
        super().__init__()
        self.window_size = window_size
        self.scale = dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.get_v = nn.Conv2d(dim, dim, kernel_size=3, stride=1, padding=1, groups=dim)
        self.q_hook = nn.Identity()
        self.k_hook = nn.Identity()
        self.v_hook = nn.Identity()
        self.attn_hook = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend within each window of ``x`` ([B, C, H, W], H and W multiples of the window size)."""
        batch, channels, height, width = x.shape
        ws = self.window_size
        rows, cols = height // ws, width // ws
        tokens = x.view(batch, channels, rows, ws, cols, ws).permute(0, 2, 4, 3, 5, 1)
        tokens = tokens.reshape(-1, ws * ws, channels)

        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        # locally-enhanced positional term: depth-wise 3x3 conv of each value window (zero-padded per window)
        v_maps = v.transpose(1, 2).reshape(-1, channels, ws, ws)
        lepe = self.get_v(v_maps).reshape(-1, channels, ws * ws).transpose(1, 2)

        q = self.q_hook(q * self.scale)
        k = self.k_hook(k)
        attn = self.attn_hook((q @ k.transpose(-2, -1)).softmax(dim=-1))
        out = self.proj(attn @ self.v_hook(v) + lepe)

        out = out.view(batch, rows, cols, ws, ws, channels).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(batch, channels, height, width)


class LHSB(nn.Module):
    """Low-to-high self-attention block: per-level pooled window attention, fused by a 1x1 conv gate."""

    def __init__(self, dim: int, n_levels: int = 4, window_size: int = 8) -> None:
        """dim: block width (divisible by n_levels); n_levels: pooling levels 1, 2, 4, ...; window_size: see
        WindowAttention."""
        super().__init__()
        self.n_levels = n_levels
        self.mfr = nn.ModuleList(WindowAttention(dim // n_levels, window_size) for _ in range(n_levels))
        self.aggr = nn.Conv2d(dim, dim, 1, 1, 0)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run levels coarsest first, feeding each result into the next finer level, then gate ``x``."""
        height, width = x.shape[-2:]
        groups = list(x.chunk(self.n_levels, dim=1))
        for level in range(1, self.n_levels):
            # The original's adaptive pooling to (height / 2^level, width / 2^level): the padded input divides
            # exactly, so it is a plain 2^level max pool (which, unlike adaptive pooling, exports to ONNX).
            groups[level] = F.max_pool2d(groups[level], 2**level)

        outputs = []
        for level in reversed(range(self.n_levels)):
            attended = self.mfr[level](groups[level])
            if level > 0:
                finer = groups[level - 1]
                groups[level - 1] = finer + F.interpolate(attended, size=finer.shape[-2:], mode="nearest")
            outputs.append(F.interpolate(attended, size=(height, width), mode="nearest"))
        # channel order of the fusion conv: coarsest level first
        return self.act(self.aggr(torch.cat(outputs, dim=1))) * x


class CCM(nn.Module):
    """Convolutional channel mixer (3x3 expand, GELU, 1x1 reduce): the block's feed-forward part."""

    def __init__(self, dim: int, growth_rate: float = 2.0) -> None:
        """dim: block width; growth_rate: hidden width multiplier."""
        super().__init__()
        hidden = int(dim * growth_rate)
        self.ccm = nn.Sequential(nn.Conv2d(dim, hidden, 3, 1, 1), nn.GELU(), nn.Conv2d(hidden, dim, 1, 1, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mix channels with a small spatial context."""
        return self.ccm(x)


class AttBlock(nn.Module):
    """Pre-norm residual block: LHSB attention, then the CCM feed-forward."""

    def __init__(self, dim: int, ffn_scale: float = 2.0, n_levels: int = 4, window_size: int = 8) -> None:
        """dim: width; ffn_scale: CCM growth rate; n_levels, window_size: see LHSB."""
        super().__init__()
        self.norm1 = ChannelsFirstLayerNorm(dim)
        self.norm2 = ChannelsFirstLayerNorm(dim)
        self.lhsb = LHSB(dim, n_levels, window_size)
        self.ccm = CCM(dim, ffn_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply both residual sub-layers."""
        x = self.lhsb(self.norm1(x)) + x
        return self.ccm(self.norm2(x)) + x


class LMLT(nn.Module):
    """LMLT super-resolution network: conv embedding, AttBlocks with a long skip, pixel-shuffle upsampler."""

    def __init__(
        self,
        dim: int = 36,
        n_blocks: int = 8,
        ffn_scale: float = 2.0,
        scale: int = 4,
        window_size: int = 8,
        n_levels: int = 4,
    ) -> None:
        """dim: feature width (divisible by n_levels; 36 for Tiny); n_blocks: AttBlocks (8 for Tiny);
        ffn_scale: CCM growth rate; scale: upscaling factor; window_size: attention window side at every
        level; n_levels: pooling levels per block (the coarsest pools by 2**(n_levels-1))."""
        super().__init__()
        if dim % n_levels:
            raise ValueError(f"dim={dim} must be divisible by n_levels={n_levels}")
        self.scale = scale
        # the coarsest level must still tile into whole windows
        self.pad_multiple = window_size * 2 ** (n_levels - 1)
        self.to_feat = nn.Conv2d(3, dim, 3, 1, 1)
        blocks = (AttBlock(dim, ffn_scale, n_levels, window_size) for _ in range(n_blocks))
        self.feats = nn.Sequential(*blocks)
        self.to_img = nn.Sequential(nn.Conv2d(dim, 3 * scale**2, 3, 1, 1), nn.PixelShuffle(scale))
        self.stage_names: tuple[str, ...] = tuple(f"feats.{i}" for i in range(n_blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Upscale RGB ``x`` in [0, 1] ([B, 3, H, W]) to [B, 3, scale*H, scale*W].

        As in the original, the input is reflect-padded (bottom/right) to ``pad_multiple`` and the features
        are cropped back to H x W before the reconstruction conv.
        """
        height, width = x.shape[-2:]
        feat = self.to_feat(reflect_pad_to(x, self.pad_multiple, self.pad_multiple))
        feat = self.feats(feat) + feat
        return self.to_img(feat[:, :, :height, :width])
