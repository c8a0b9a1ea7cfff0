"""Calibration data: seeded random LR crops (optionally with their HR crops) from any folder of images.

Calibration and fine-tuning must never see a test image, so a folder that is, or contains copies of, a
benchmark set is refused.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from srquant.data.imresize import bicubic_downsample
from srquant.data.io import list_images, read_image
from srquant.errors import SrquantError


@dataclass(frozen=True)
class CalibrationConfig:
    """How many crops, how large (LR pixels), from which folder, at which scale, with which seed."""

    folder: Path
    scale: int
    count: int = 32
    size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.count < 1:
            raise SrquantError(f"calibration count must be >= 1, got {self.count}")
        if self.size < 4:
            raise SrquantError(f"calibration crop size must be >= 4, got {self.size}")
        if self.scale < 1:
            raise SrquantError(f"scale must be >= 1, got {self.scale}")


@lru_cache(maxsize=8)
def _benchmark_digests(datasets_root: Path) -> frozenset[str]:
    """sha256 of every benchmark image under an asset directory's `datasets/` folder."""
    if not datasets_root.is_dir():
        return frozenset()
    return frozenset(hashlib.sha256(p.read_bytes()).hexdigest() for p in datasets_root.rglob("*") if p.is_file())


def check_not_benchmark(folder: Path, paths: list[Path], datasets_root: Path | None) -> None:
    """Refuse a calibration folder inside the benchmark tree or holding a copy of any benchmark image."""
    if datasets_root is None:
        return
    root = datasets_root.resolve()
    where = folder.resolve()
    if where == root or root in where.parents:
        raise SrquantError(f"calibration folder {folder} is a benchmark set; calibrate on training images")
    known = _benchmark_digests(root)
    for path in paths:
        if hashlib.sha256(path.read_bytes()).hexdigest() in known:
            raise SrquantError(f"calibration image {path} is a benchmark test image; calibration must not see it")


class CropSampler:
    """Draws random aligned (LR, HR) crops from a folder of training images, loading each image once.

    Images are read and bicubic-downsampled on first use; images too small for the crop are skipped.
    """

    def __init__(self, folder: Path, scale: int, size: int, datasets_root: Path | None = None) -> None:
        self.paths = list_images(folder)
        if not self.paths:
            raise SrquantError(f"calibration folder {folder} has no images")
        check_not_benchmark(folder, self.paths, datasets_root)
        self.folder, self.scale, self.size = folder, scale, size
        self._loaded: dict[int, tuple[np.ndarray, np.ndarray] | None] = {}

    def _image(self, index: int) -> tuple[np.ndarray, np.ndarray] | None:
        if index not in self._loaded:
            s = self.scale
            hr = read_image(self.paths[index])
            hr = hr[: hr.shape[0] - hr.shape[0] % s, : hr.shape[1] - hr.shape[1] % s]
            fits = hr.shape[0] // s >= self.size and hr.shape[1] // s >= self.size
            self._loaded[index] = (hr, bicubic_downsample(hr, s)) if fits else None
        return self._loaded[index]

    def draw(
        self, count: int, rng: np.random.Generator, with_hr: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`count` LR crops (N x 3 x size x size in [0, 1]) and, if asked, the aligned HR crops."""
        s, size = self.scale, self.size
        lr_crops, hr_crops = [], []
        attempts = 0
        while len(lr_crops) < count:
            attempts += 1
            if attempts > 50 * count + 10 * len(self.paths):
                raise SrquantError(f"no image in {self.folder} is large enough for {size}px LR crops at x{s}")
            pair = self._image(int(rng.integers(len(self.paths))))
            if pair is None:
                continue
            hr, lr = pair
            top = int(rng.integers(lr.shape[0] - size + 1))
            left = int(rng.integers(lr.shape[1] - size + 1))
            lr_crops.append(lr[top : top + size, left : left + size])
            if with_hr:
                hr_crops.append(hr[top * s : (top + size) * s, left * s : (left + size) * s])
        lr_t = torch.from_numpy(np.stack(lr_crops)).permute(0, 3, 1, 2).float().div_(255.0)
        hr_t = torch.from_numpy(np.stack(hr_crops)).permute(0, 3, 1, 2).float().div_(255.0) if with_hr else None
        return lr_t, hr_t


def sample_crops(
    config: CalibrationConfig, datasets_root: Path | None = None, with_hr: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Draw `count` seeded random LR crops (and, if asked, HR crops): the same config gives the same tensors."""
    sampler = CropSampler(config.folder, config.scale, config.size, datasets_root)
    return sampler.draw(config.count, np.random.default_rng(config.seed), with_hr)
