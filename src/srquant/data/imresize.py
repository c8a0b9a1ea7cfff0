"""MATLAB-exact `imresize(img, scale, 'bicubic')` for uint8 images, written for the SR benchmark protocol.

MATLAB resizes one dimension at a time (the dimension with the smaller scale first, rows on a tie), with a
Keys cubic kernel (a = -0.5) that is stretched by 1/scale when shrinking (antialiasing), symmetric border
handling, and for uint8 input it rounds (half away from zero) and saturates back to uint8 after every pass.
Copying that last detail is what makes the output equal the official LR benchmark images bit for bit;
ports that keep floats between passes are off by one or two levels on many pixels.
"""

from __future__ import annotations

import math

import numpy as np

KERNEL_WIDTH = 4.0


def cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's 'bicubic')."""
    ax = np.abs(x)
    ax2, ax3 = ax * ax, ax * ax * ax
    near = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1)
    far = (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2))
    return near + far


def contributions(in_len: int, out_len: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Weights and source indices (0-based, mirrored at the borders), one row per output sample."""
    if scale < 1:
        width = KERNEL_WIDTH / scale

        def kernel(t: np.ndarray) -> np.ndarray:
            return scale * cubic(scale * t)
    else:
        width = KERNEL_WIDTH
        kernel = cubic
    out_pos = np.arange(1, out_len + 1, dtype=np.float64)
    centre = out_pos / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(centre - width / 2.0)
    taps = int(math.ceil(width)) + 2
    indices = left[:, None] + np.arange(taps, dtype=np.float64)[None, :]
    weights = kernel(centre[:, None] - indices)
    weights /= weights.sum(axis=1, keepdims=True)
    mirror = np.concatenate([np.arange(in_len), np.arange(in_len - 1, -1, -1)])
    src = mirror[np.mod(indices.astype(np.int64) - 1, 2 * in_len)]
    keep = np.any(weights != 0, axis=0)
    return weights[:, keep], src[:, keep]


def resize_axis(img: np.ndarray, axis: int, out_len: int, scale: float) -> np.ndarray:
    """Resize a float64 array along one axis with MATLAB's bicubic weights."""
    weights, src = contributions(img.shape[axis], out_len, scale)
    moved = np.moveaxis(img, axis, 0)
    gathered = moved[src]  # (out_len, taps, ...rest)
    shape = weights.shape + (1,) * (moved.ndim - 1)
    result = (gathered * weights.reshape(shape)).sum(axis=1)
    return np.moveaxis(result, 0, axis)


def round_to_uint8(values: np.ndarray) -> np.ndarray:
    """Round half away from zero and saturate to [0, 255], as MATLAB casts double to uint8."""
    rounded = np.sign(values) * np.floor(np.abs(values) + 0.5)
    return np.clip(rounded, 0, 255).astype(np.uint8)


def imresize(img: np.ndarray, scale: float) -> np.ndarray:
    """Resize an HxW or HxWxC uint8 image by `scale` exactly as MATLAB's `imresize(img, scale)` does."""
    if img.dtype != np.uint8:
        raise TypeError(f"imresize expects uint8 input, got {img.dtype}")
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    out_shape = [int(math.ceil(img.shape[0] * scale)), int(math.ceil(img.shape[1] * scale))]
    out = img
    # Both axes share one scale here, so MATLAB's order (smallest scale first, ties: rows first) is rows, cols.
    for axis in (0, 1):
        out = round_to_uint8(resize_axis(out.astype(np.float64), axis, out_shape[axis], scale))
    return out


def modcrop(img: np.ndarray, scale: int) -> np.ndarray:
    """Crop the bottom/right so both sides are multiples of `scale` (the benchmark convention)."""
    h, w = img.shape[:2]
    return img[: h - h % scale, : w - w % scale]


def bicubic_downsample(hr: np.ndarray, scale: int) -> np.ndarray:
    """The benchmark LR image: MATLAB `imresize(modcrop(HR, s), 1/s, 'bicubic')`."""
    return imresize(modcrop(hr, scale), 1.0 / scale)
