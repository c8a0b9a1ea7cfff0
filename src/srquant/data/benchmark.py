"""Benchmark test sets: folders of HR images whose LR inputs srquant generates with MATLAB-exact bicubic."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from srquant.assets import asset_dir, user_cache_dir
from srquant.data.imresize import bicubic_downsample, modcrop
from srquant.data.io import list_images, read_image, write_image
from srquant.errors import SrquantError

BENCHMARKS = ("Set5", "Set14", "B100", "Urban100", "Manga109")
ALIASES = {"bsd100": "B100", "bsds100": "B100"}


def canonical_name(name: str) -> str:
    """Map a user's spelling (any case, BSD100) to the benchmark folder name."""
    lowered = name.strip().lower()
    for known in BENCHMARKS:
        if known.lower() == lowered:
            return known
    return ALIASES.get(lowered, name.strip())


@dataclass(frozen=True)
class BenchmarkImage:
    """One test pair: the HR image cropped to a multiple of the scale, and its bicubic LR input."""

    name: str
    hr: np.ndarray
    lr: np.ndarray


@dataclass(frozen=True)
class BenchmarkSet:
    """A named folder of HR images; LR images are generated per scale and cached on disk."""

    name: str
    hr_dir: Path
    cache_dir: Path

    @classmethod
    def from_assets(cls, name: str, assets: str | Path | None = None, cache: Path | None = None) -> BenchmarkSet:
        """Find `<assets>/datasets/<name>/HR`; a missing set raises with the path that was looked at."""
        canonical = canonical_name(name)
        root = asset_dir(assets)
        hr_dir = root / "datasets" / canonical / "HR"
        if not hr_dir.is_dir():
            hint = " (Manga109 is not shipped: place your own copy there)" if canonical == "Manga109" else ""
            raise SrquantError(f"benchmark {canonical!r} not found: no folder {hr_dir}{hint}")
        return cls(canonical, hr_dir, cache or user_cache_dir() / "lr")

    def image_paths(self) -> list[Path]:
        """HR image files, sorted by name."""
        paths = list_images(self.hr_dir)
        if not paths:
            raise SrquantError(f"benchmark {self.name!r}: no images in {self.hr_dir}")
        return paths

    def lr_for(self, hr_path: Path, hr: np.ndarray, scale: int) -> np.ndarray:
        """The bicubic LR image for one HR file, from the cache when it was made before from the same bytes."""
        digest = hashlib.sha256(hr_path.read_bytes()).hexdigest()[:24]
        cached = self.cache_dir / f"{digest}_x{scale}.png"
        if cached.is_file():
            try:
                return read_image(cached)
            except SrquantError:
                cached.unlink(missing_ok=True)  # a damaged cache entry is regenerated
        lr = bicubic_downsample(hr, scale)
        tmp = cached.with_suffix(".tmp.png")
        try:
            write_image(tmp, lr)
            tmp.replace(cached)
        except OSError:
            tmp.unlink(missing_ok=True)  # an unwritable cache only costs time
        return lr

    def iter_pairs(self, scale: int) -> Iterator[BenchmarkImage]:
        """Yield (name, HR modcropped, LR) for every image, in name order."""
        if scale < 1:
            raise SrquantError(f"scale must be a positive integer, got {scale}")
        for path in self.image_paths():
            hr = read_image(path)
            if min(hr.shape[:2]) < 2 * scale + 2:
                raise SrquantError(f"{path}: image {hr.shape[1]}x{hr.shape[0]} is too small for x{scale}")
            yield BenchmarkImage(path.stem, modcrop(hr, scale), self.lr_for(path, hr, scale))

    def __len__(self) -> int:
        return len(self.image_paths())
