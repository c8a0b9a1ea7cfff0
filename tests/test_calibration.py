"""Calibration crops: seeded, aligned with HR, and never drawn from a benchmark set."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from srquant.data.calibration import CalibrationConfig, sample_crops
from srquant.data.imresize import bicubic_downsample
from srquant.errors import SrquantError

MakeFolder = Callable[..., Path]


def test_same_seed_same_crops_other_seed_other_crops(noise_images: MakeFolder) -> None:
    folder = noise_images(3, 48, width_step=8)
    a, _ = sample_crops(CalibrationConfig(folder, scale=2, count=4, size=8, seed=7))
    b, _ = sample_crops(CalibrationConfig(folder, scale=2, count=4, size=8, seed=7))
    c, _ = sample_crops(CalibrationConfig(folder, scale=2, count=4, size=8, seed=8))
    assert a.shape == (4, 3, 8, 8) and torch.equal(a, b) and not torch.equal(a, c)


def test_hr_crops_are_aligned_with_lr(noise_images: MakeFolder) -> None:
    folder = noise_images(1, 40)
    lr, hr = sample_crops(CalibrationConfig(folder, scale=2, count=1, size=20, seed=0), with_hr=True)
    assert hr is not None and hr.shape == (1, 3, 40, 40)  # the whole image: only one position fits
    hr_u8 = (hr[0].permute(1, 2, 0) * 255).round().byte().numpy()
    lr_u8 = (lr[0].permute(1, 2, 0) * 255).round().byte().numpy()
    assert np.array_equal(bicubic_downsample(hr_u8, 2), lr_u8)


def test_benchmark_folder_and_copies_are_refused(tmp_path: Path, noise_images: MakeFolder) -> None:
    datasets = tmp_path / "datasets" / "Set5" / "HR"
    datasets.mkdir(parents=True)
    train = noise_images(3, 48, width_step=8)
    with pytest.raises(SrquantError, match="benchmark"):
        sample_crops(CalibrationConfig(datasets.parent, scale=2, count=1, size=8), datasets_root=tmp_path / "datasets")
    shutil.copy(train / "1.png", datasets / "leaked.png")
    with pytest.raises(SrquantError, match="benchmark test image"):
        sample_crops(CalibrationConfig(train, scale=2, count=1, size=8), datasets_root=tmp_path / "datasets")


def test_too_small_images_and_bad_config(noise_images: MakeFolder) -> None:
    folder = noise_images(1, 16)
    with pytest.raises(SrquantError, match="large enough"):
        sample_crops(CalibrationConfig(folder, scale=4, count=1, size=8))
    with pytest.raises(SrquantError):
        CalibrationConfig(folder, scale=2, count=0)
