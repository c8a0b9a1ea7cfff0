"""PSNR and SSIM on the Y channel, in the two conventions SR papers use; every result names its convention.

- `basicsr` (BasicSR, SwinIR, 2DQuant): Y = (65.481 R + 128.553 G + 24.966 B)/255 + 16 from the SR image
  rounded to uint8; `scale` border pixels cropped; SSIM with an 11x11 Gaussian window (sigma 1.5) over the
  valid region.
- `edsr` (EDSR-PyTorch, AdaBM, Granular-DQ): Y with coefficients (65.738, 129.057, 25.064)/256 and no
  offset, from the rounded SR image; `scale` border pixels shaved; PSNR from the float Y difference; SSIM
  (AdaBM's `ssim_matlab`) with the same Gaussian window but replicate padding, averaged over every pixel.

The two Y weightings are the same BT.601 weights normalised differently, so PSNR agrees to about 1e-5 dB;
SSIM differs (the offset enters its luminance term, and the border handling differs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from srquant.errors import SrquantError


@dataclass(frozen=True)
class Convention:
    """How a convention turns RGB into Y (coefficients over [0, 255] RGB, then an offset)."""

    name: str
    coeffs: tuple[float, float, float]
    offset: float
    ssim_padding: str  # "valid": score only fully covered pixels; "replicate": pad and score every pixel


CONVENTIONS: dict[str, Convention] = {
    "basicsr": Convention("basicsr", (65.481 / 255.0, 128.553 / 255.0, 24.966 / 255.0), 16.0, "valid"),
    "edsr": Convention("edsr", (65.738 / 256.0, 129.057 / 256.0, 25.064 / 256.0), 0.0, "replicate"),
}


def get_convention(name: str) -> Convention:
    """Look up a convention by name; an unknown name lists the known ones."""
    try:
        return CONVENTIONS[name]
    except KeyError:
        raise SrquantError(f"unknown metric convention {name!r}; choose from {', '.join(CONVENTIONS)}") from None


def y_channel(img: np.ndarray, convention: Convention) -> np.ndarray:
    """HxWx3 uint8 RGB -> HxW float64 Y under the convention's coefficients and offset."""
    rgb = img.astype(np.float64)
    r, g, b = convention.coeffs
    return rgb[..., 0] * r + rgb[..., 1] * g + rgb[..., 2] * b + convention.offset


def _crop(y: np.ndarray, border: int) -> np.ndarray:
    return y[border:-border, border:-border] if border > 0 else y


def _check_pair(sr: np.ndarray, hr: np.ndarray, border: int) -> None:
    if sr.shape != hr.shape:
        raise SrquantError(f"SR shape {sr.shape} differs from HR shape {hr.shape}")
    if sr.dtype != np.uint8 or hr.dtype != np.uint8:
        raise SrquantError("PSNR/SSIM take uint8 images (round the SR output first)")
    if min(sr.shape[:2]) <= 2 * border:
        raise SrquantError(f"image {sr.shape[1]}x{sr.shape[0]} is too small for a {border}px border crop")


def psnr_y(sr: np.ndarray, hr: np.ndarray, border: int, convention: str = "basicsr") -> float:
    """PSNR in dB between two uint8 RGB images on Y, `border` pixels cropped on each side."""
    _check_pair(sr, hr, border)
    conv = get_convention(convention)
    diff = _crop(y_channel(sr, conv), border) - _crop(y_channel(hr, conv), border)
    mse = float(np.mean(diff * diff))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0 * 255.0 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(coords**2) / (2.0 * sigma * sigma))
    g /= g.sum()
    return torch.outer(g, g).view(1, 1, size, size)


def ssim_y(sr: np.ndarray, hr: np.ndarray, border: int, convention: str = "basicsr") -> float:
    """SSIM on Y with an 11x11 Gaussian window (sigma 1.5); border handling as the convention says."""
    _check_pair(sr, hr, border)
    conv = get_convention(convention)
    x = torch.from_numpy(_crop(y_channel(sr, conv), border)).view(1, 1, *_crop(sr, border).shape[:2])
    y = torch.from_numpy(_crop(y_channel(hr, conv), border)).view_as(x)
    if min(x.shape[-2:]) < 11:
        raise SrquantError(f"image too small for 11x11 SSIM after a {border}px border crop")
    window = _gaussian_window()
    if conv.ssim_padding == "replicate":
        x, y = F.pad(x, (5, 5, 5, 5), mode="replicate"), F.pad(y, (5, 5, 5, 5), mode="replicate")
    c1, c2 = (0.01 * 255.0) ** 2, (0.03 * 255.0) ** 2
    mu_x, mu_y = F.conv2d(x, window), F.conv2d(y, window)
    sxx = F.conv2d(x * x, window) - mu_x**2
    syy = F.conv2d(y * y, window) - mu_y**2
    sxy = F.conv2d(x * y, window) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return float(ssim_map.mean())
