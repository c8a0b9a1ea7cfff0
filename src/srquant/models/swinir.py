"""SwinIR: image restoration with shifted-window Swin transformers (Liang et al., ICCVW 2021).

Lightweight super-resolution variant only: a 3x3 conv embeds the image, residual Swin transformer blocks
(RSTB: a stack of window-attention blocks, every second one on windows shifted by half a window, then a 3x3
conv and a skip) refine the features, and one conv plus pixel shuffle ("pixelshuffledirect") upsamples.
The residual connection is the single-conv ("1conv") kind.

Parameter and buffer names follow JingyunLiang/SwinIR ``models/network_swinir.py``, so the released files
``002_lightweightSR_DIV2K_s64w8_SwinIR-S_x{2,3,4}.pth`` (state dict under ``params``) load strictly into
``SwinIR(scale=s)`` with the defaults below. Like the original, the checkpoint holds two kinds of
non-learned buffers, and so does this module: ``...attn.relative_position_index`` in every attention module
and ``...attn_mask`` (the shifted-window mask for the ``img_size`` training crop, ``[(img_size /
window_size) ** 2, window_size ** 2, window_size ** 2]``) in every shifted (odd-index) block; non-shifted
blocks have no ``attn_mask`` key. The RGB mean is a non-persistent buffer (the original keeps it outside
the state dict). Stochastic depth and dropout (all zero at test time) are left out.

Inputs are RGB in [0, 1]. ``forward`` pads like the official ``main_test_swinir.py``: bottom and right are
extended by mirroring (edge included, ``torch.flip``) by ``(n // window_size + 1) * window_size - n``
pixels, i.e. 1 to ``window_size`` pixels even when ``n`` already is a multiple, and the output is cropped.
"""

import torch
from torch import nn

TINY_KWARGS: dict[str, object] = {
    "img_size": 16,
    "window_size": 4,
    "embed_dim": 12,
    "depths": (2, 2),
    "num_heads": (2, 2),
}
"""Small configuration (two groups of a plain and a shifted block) for tests; pass ``scale`` separately."""

DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)
"""Mean RGB of DIV2K on a [0, 1] scale, removed before and restored after the network."""

MASKED_LOGIT = -100.0
"""Value the original adds to attention logits between tokens from different regions of a shifted window."""


def mirror_extend(x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """Extend ``x`` along ``dim`` to ``length`` by appending its mirror image (x, flip(x), x, ...).

    For ``length <= 2 * size`` this is exactly the official ``cat([x, flip(x)])[:length]``; longer extensions
    (tiny inputs the official script cannot handle) repeat the mirror pattern.
    """
    size = x.shape[dim]
    pieces = [x, x.flip(dim)] * -(-length // (2 * size))
    return torch.cat(pieces, dim).narrow(dim, 0, length)


def pad_like_official_test(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """Mirror-pad bottom/right of ``x`` by 1..window_size pixels to a window multiple (official test)."""
    height, width = x.shape[-2:]
    x = mirror_extend(x, (height // window_size + 1) * window_size, dim=-2)
    return mirror_extend(x, (width // window_size + 1) * window_size, dim=-1)


def window_tokens(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """Split a ``[B, H, W, C]`` map into non-overlapping windows: ``[B * nW, window_size**2, C]``."""
    batch, height, width, channels = x.shape
    x = x.view(batch, height // window_size, window_size, width // window_size, window_size, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size * window_size, channels)


def merge_windows(windows: torch.Tensor, window_size: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`window_tokens`: reassemble ``[B * nW, window_size**2, C]`` into ``[B, H, W, C]``."""
    rows, cols = height // window_size, width // window_size
    x = windows.view(-1, rows, cols, window_size, window_size, windows.shape[-1])
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, windows.shape[-1])


def shifted_window_mask(height: int, width: int, window_size: int, shift: int) -> torch.Tensor:
    """Additive mask ``[nW, N, N]`` keeping attention inside the regions that a cyclic shift brought together.

    After rolling the map by ``-shift``, the last window row/column holds pixels from up to three separate
    image regions; tokens may only attend to tokens of their own region (0), others get ``MASKED_LOGIT``.
    """
    regions = torch.zeros(1, height, width, 1)
    bands = (slice(0, -window_size), slice(-window_size, -shift), slice(-shift, None))
    label = 0
    for rows in bands:
        for cols in bands:
            regions[:, rows, cols, :] = label
            label += 1
    labels = window_tokens(regions, window_size).squeeze(-1)
    differs = labels.unsqueeze(1) != labels.unsqueeze(2)
    return torch.zeros(differs.shape).masked_fill(differs, MASKED_LOGIT)


def relative_position_index(window_size: int) -> torch.Tensor:
    """Index ``[N, N]`` into the ``(2w-1)**2`` relative-position bias table for each pair of window tokens."""
    rows, cols = torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")
    coords = torch.stack((rows.flatten(), cols.flatten()))
    delta = (coords[:, :, None] - coords[:, None, :]) + (window_size - 1)
    return delta[0] * (2 * window_size - 1) + delta[1]


class WindowAttention(nn.Module):
    """Multi-head self-attention inside square windows with a learned relative-position bias.

    The identity hooks ``q_hook``, ``k_hook``, ``v_hook`` (scaled query, key, value) and ``attn_hook``
    (post-softmax attention) sit right before the two matmuls, so quantizers can replace them.
    """

    def __init__(self, dim: int, window_size: int, num_heads: int) -> None:
        """Build the attention; ``dim`` is the token width, split over ``num_heads`` heads."""
        super().__init__()
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.q_hook = nn.Identity()
        self.k_hook = nn.Identity()
        self.v_hook = nn.Identity()
        self.attn_hook = nn.Identity()
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attend within each window of ``x`` ``[B * nW, N, C]``, adding ``mask`` ``[nW, N, N]`` if given."""
        windows, tokens, channels = x.shape
        qkv = self.qkv(x).reshape(windows, tokens, 3, self.num_heads, channels // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q = self.q_hook(q * self.scale)
        k = self.k_hook(k)
        v = self.v_hook(v)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        logits = q @ k.transpose(-2, -1) + bias.view(tokens, tokens, -1).permute(2, 0, 1)
        if mask is not None:
            per_image = mask.shape[0]
            logits = logits.view(-1, per_image, self.num_heads, tokens, tokens)
            logits = (logits + mask.to(logits.dtype)[None, :, None]).view(-1, self.num_heads, tokens, tokens)
        attn = self.attn_hook(logits.softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(windows, tokens, channels)
        return self.proj(out)


class Mlp(nn.Module):
    """Two-layer GELU feed-forward network applied to every token."""

    def __init__(self, dim: int, hidden: int) -> None:
        """Build the MLP; ``hidden`` is the width of its middle layer."""
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Transform each token of ``x``."""
        return self.fc2(self.act(self.fc1(x)))


class SwinTransformerBlock(nn.Module):
    """Pre-norm transformer block: (shifted-)window attention and an MLP, each with a skip connection."""

    def __init__(self, dim: int, num_heads: int, window_size: int, shift: int, mlp_ratio: float, img_size: int) -> None:
        """Build the block; ``shift`` > 0 rolls the windows, ``img_size`` sizes the stored ``attn_mask``."""
        super().__init__()
        self.window_size = window_size
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        mask = shifted_window_mask(img_size, img_size, window_size, shift) if shift else None
        self.register_buffer("attn_mask", mask)

    def forward(self, x: torch.Tensor, size: tuple[int, int], mask: torch.Tensor | None) -> torch.Tensor:
        """Refine tokens ``x`` ``[B, H*W, C]`` of a ``size`` map; ``mask`` replaces ``attn_mask`` if given.

        ``mask`` is the shifted-window mask for ``size`` when it differs from the training crop.
        """
        height, width = size
        batch, length, channels = x.shape
        y = self.norm1(x).view(batch, height, width, channels)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
            mask = self.attn_mask if mask is None else mask
        else:
            mask = None
        y = self.attn(window_tokens(y, self.window_size), mask)
        y = merge_windows(y, self.window_size, height, width)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + y.reshape(batch, length, channels)
        return x + self.mlp(self.norm2(x))


class BlockStack(nn.Module):
    """The Swin blocks of one residual group, alternating plain and shifted windows."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float, img_size: int) -> None:
        """Build ``depth`` blocks; odd-index blocks shift their windows by half a window."""
        super().__init__()
        shifts = [(i % 2) * (window_size // 2) for i in range(depth)]
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(dim, num_heads, window_size, shift, mlp_ratio, img_size) for shift in shifts
        )

    def forward(self, x: torch.Tensor, size: tuple[int, int], mask: torch.Tensor | None) -> torch.Tensor:
        """Run the blocks in order on tokens ``x`` of a ``size`` map."""
        for block in self.blocks:
            x = block(x, size, mask)
        return x


class RSTB(nn.Module):
    """Residual Swin transformer block: Swin blocks, a 3x3 conv on the re-imaged tokens, and a skip."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float, img_size: int) -> None:
        """Build the group; the arguments are those of :class:`BlockStack`."""
        super().__init__()
        self.residual_group = BlockStack(dim, depth, num_heads, window_size, mlp_ratio, img_size)
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int], mask: torch.Tensor | None) -> torch.Tensor:
        """Refine tokens ``x`` ``[B, H*W, C]`` and add them back to the input."""
        y = self.residual_group(x, size, mask)
        y = y.transpose(1, 2).reshape(x.shape[0], x.shape[2], *size)
        return self.conv(y).flatten(2).transpose(1, 2) + x


class PatchEmbed(nn.Module):
    """Turn a ``[B, C, H, W]`` feature map into layer-normed tokens ``[B, H*W, C]`` (patch size 1)."""

    def __init__(self, dim: int) -> None:
        """Build the token norm for width ``dim``."""
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Flatten the spatial axes of ``x`` into tokens and normalize them."""
        return self.norm(x.flatten(2).transpose(1, 2))


class SwinIR(nn.Module):
    """Lightweight SwinIR ("SwinIR-S") for x2/x3/x4 super-resolution of RGB images in [0, 1]."""

    def __init__(
        self,
        scale: int,
        img_size: int = 64,
        window_size: int = 8,
        embed_dim: int = 60,
        depths: tuple[int, ...] = (6, 6, 6, 6),
        num_heads: tuple[int, ...] = (6, 6, 6, 6),
        mlp_ratio: float = 2.0,
        img_range: float = 1.0,
    ) -> None:
        """Build the network; the defaults are the released lightweight configuration.

        ``scale`` is the upscaling factor; ``img_size`` the training crop side, which fixes the shape of
        the stored shifted-window masks (64 in the release); ``window_size`` the attention window side;
        ``embed_dim`` the feature width; ``depths``/``num_heads`` the block count and heads of each
        residual group; ``mlp_ratio`` the MLP width over ``embed_dim``; ``img_range`` the factor the
        mean-subtracted input is multiplied by (1 for the release).
        """
        super().__init__()
        if img_size <= window_size or img_size % window_size:
            raise ValueError(f"img_size {img_size} must be a multiple of window_size {window_size} above it")
        if len(depths) != len(num_heads):
            raise ValueError("depths and num_heads need one entry per residual group")
        self.scale = scale
        self.pad_multiple = window_size
        self.img_size = img_size
        self.window_size = window_size
        self.img_range = img_range
        self.has_shifted_blocks = window_size > 1 and max(depths) > 1
        self.register_buffer("mean", torch.tensor(DIV2K_RGB_MEAN).view(1, 3, 1, 1), persistent=False)
        self.conv_first = nn.Conv2d(3, embed_dim, 3, padding=1)
        self.patch_embed = PatchEmbed(embed_dim)
        self.layers = nn.ModuleList(
            RSTB(embed_dim, depth, heads, window_size, mlp_ratio, img_size)
            for depth, heads in zip(depths, num_heads, strict=True)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = nn.Conv2d(embed_dim, embed_dim, 3, padding=1)
        self.upsample = nn.Sequential(nn.Conv2d(embed_dim, 3 * scale * scale, 3, padding=1), nn.PixelShuffle(scale))
        self.stage_names: tuple[str, ...] = tuple(f"layers.{i}" for i in range(len(depths)))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """Initialize like the original: truncated-normal linear weights, zero biases, unit layer norms."""
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Run the residual Swin groups on a ``[B, C, H, W]`` map whose sides are window multiples."""
        size = (x.shape[2], x.shape[3])
        mask = None
        if self.has_shifted_blocks and size != (self.img_size, self.img_size):
            shift = self.window_size // 2
            mask = shifted_window_mask(*size, self.window_size, shift).to(x.device)
        tokens = self.patch_embed(x)
        for layer in self.layers:
            tokens = layer(tokens, size, mask)
        return self.norm(tokens).transpose(1, 2).reshape(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Upscale RGB ``x`` ``[B, 3, H, W]`` in [0, 1] to ``[B, 3, scale*H, scale*W]`` (not clamped)."""
        height, width = x.shape[-2:]
        x = (pad_like_official_test(x, self.window_size) - self.mean) * self.img_range
        feat = self.conv_first(x)
        out = self.upsample(self.conv_after_body(self.forward_features(feat)) + feat)
        out = out / self.img_range + self.mean
        return out[..., : height * self.scale, : width * self.scale]
