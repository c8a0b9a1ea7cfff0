"""PSNR/SSIM conventions against independent hand computations on small images."""

from __future__ import annotations

import math

import numpy as np
import pytest

from srquant.errors import SrquantError
from srquant.metrics.psnr_ssim import psnr_y, ssim_y


def _rand(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_psnr_of_a_known_gray_offset() -> None:
    # Gray images (R=G=B) differing by d levels: Y differs by d * (65.481 + 128.553 + 24.966) / 255.
    hr = np.full((20, 20, 3), 100, dtype=np.uint8)
    sr = np.full((20, 20, 3), 104, dtype=np.uint8)
    dy = 4 * 219.0 / 255.0
    assert psnr_y(sr, hr, border=2, convention="basicsr") == pytest.approx(10 * math.log10(255**2 / dy**2))
    dy_edsr = 4 * (65.738 + 129.057 + 25.064) / 256.0
    assert psnr_y(sr, hr, border=2, convention="edsr") == pytest.approx(10 * math.log10(255**2 / dy_edsr**2))


def test_border_is_excluded() -> None:
    hr = _rand((24, 24, 3), 0)
    sr = hr.copy()
    sr[:3] = 0  # damage only the top 3 rows
    assert psnr_y(sr, hr, border=3) == math.inf
    assert psnr_y(sr, hr, border=2) < 60


def _ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Direct window-by-window SSIM on the valid region (an independent, slow formulation)."""
    coords = np.arange(11) - 5.0
    g = np.exp(-(coords**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for i in range(a.shape[0] - 10):
        for j in range(a.shape[1] - 10):
            pa, pb = a[i : i + 11, j : j + 11], b[i : i + 11, j : j + 11]
            ma, mb = (w * pa).sum(), (w * pb).sum()
            va, vb = (w * pa * pa).sum() - ma**2, (w * pb * pb).sum() - mb**2
            cov = (w * pa * pb).sum() - ma * mb
            vals.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_matches_direct_formula() -> None:
    hr, sr = _rand((20, 22, 3), 1), _rand((20, 22, 3), 2)
    coef = np.array([65.481, 128.553, 24.966]) / 255.0
    y = lambda im: im[2:-2, 2:-2].astype(np.float64) @ coef + 16.0  # noqa: E731
    assert ssim_y(sr, hr, border=2, convention="basicsr") == pytest.approx(_ssim_reference(y(sr), y(hr)), abs=1e-10)


def test_identical_images_score_perfectly_in_both_conventions() -> None:
    img = _rand((30, 30, 3), 3)
    for conv in ("basicsr", "edsr"):
        assert psnr_y(img, img, 4, conv) == math.inf
        assert ssim_y(img, img, 4, conv) == pytest.approx(1.0)


def test_conventions_differ_in_ssim_but_not_much_in_psnr() -> None:
    hr = _rand((32, 32, 3), 4)
    sr = np.clip(hr.astype(int) + np.random.default_rng(5).integers(-20, 21, hr.shape), 0, 255).astype(np.uint8)
    assert abs(psnr_y(sr, hr, 4, "basicsr") - psnr_y(sr, hr, 4, "edsr")) < 1e-3
    assert ssim_y(sr, hr, 4, "basicsr") != pytest.approx(ssim_y(sr, hr, 4, "edsr"), abs=1e-6)


def test_bad_inputs() -> None:
    a = _rand((20, 20, 3), 6)
    with pytest.raises(SrquantError, match="shape"):
        psnr_y(a, a[:-1], 2)
    with pytest.raises(SrquantError, match="uint8"):
        psnr_y(a.astype(np.float32), a.astype(np.float32), 2)
    with pytest.raises(SrquantError, match="unknown metric convention"):
        psnr_y(a, a, 2, "matlab")
