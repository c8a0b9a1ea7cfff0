"""MATLAB-exact bicubic: bit-exact against the official Set5 LR images, and basic properties."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from srquant.data.imresize import bicubic_downsample, contributions, cubic, imresize, modcrop
from srquant.data.io import read_image


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_set5_lr_bit_exact(assets: Path, scale: int) -> None:
    hr_dir = assets / "datasets" / "Set5" / "HR"
    for hr_path in sorted(hr_dir.glob("*.png")):
        reference = read_image(
            assets / "datasets" / "Set5" / "LR_bicubic" / f"X{scale}" / f"{hr_path.stem}x{scale}.png"
        )
        ours = bicubic_downsample(read_image(hr_path), scale)
        assert ours.shape == reference.shape
        assert np.array_equal(ours, reference), f"{hr_path.name} x{scale}: {(ours != reference).sum()} pixels differ"


def test_kernel_values() -> None:
    # Keys cubic with a = -0.5: 1 at 0, 0 at the integers, 0.5625 and -0.0625 at the half points.
    x = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 2.5])
    assert np.allclose(cubic(x), [1.0, 0.5625, 0.0, -0.0625, 0.0, 0.0])


def test_weights_sum_to_one_and_indices_in_range() -> None:
    weights, src = contributions(in_len=37, out_len=10, scale=10 / 37)
    assert np.allclose(weights.sum(axis=1), 1.0)
    assert src.min() >= 0 and src.max() < 37


def test_constant_image_stays_constant_and_sizes_round_up() -> None:
    img = np.full((13, 10, 3), 77, dtype=np.uint8)
    out = imresize(img, 1 / 3)
    assert out.shape == (5, 4, 3)  # ceil(13/3), ceil(10/3)
    assert np.all(out == 77)


def test_scale_one_is_identity() -> None:
    img = np.random.default_rng(0).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    assert np.array_equal(imresize(img, 1.0), img)


def test_modcrop_and_dtype_check() -> None:
    img = np.zeros((10, 7, 3), dtype=np.uint8)
    assert modcrop(img, 3).shape == (9, 6, 3)
    with pytest.raises(TypeError):
        imresize(img.astype(np.float32), 0.5)
