"""The Python API in a few calls: load a zoo model, upscale an image, evaluate on benchmarks, make LR sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn

from srquant.assets import asset_dir
from srquant.data.benchmark import BenchmarkSet
from srquant.data.io import read_image, to_tensor, to_uint8, write_image
from srquant.evaluate import DatasetResult, evaluate
from srquant.methods.pipeline import QuantizationResult, quantize_model
from srquant.models.inference import upscale
from srquant.models.registry import create_model, get_entry
from srquant.quant.spec import QuantSpec


def load_model(
    name: str,
    scale: int,
    assets: str | Path | None = None,
    weights: str | Path | None = None,
    download: bool = False,
) -> nn.Module:
    """A zoo model with its pretrained (or given) weights, in eval mode."""
    return create_model(name, scale, assets=assets, weights=weights, allow_download=download)


def quantize(
    name: str,
    scale: int,
    method: str,
    w_bits: int,
    a_bits: int,
    calib: str | Path | None = None,
    preset: str = "cpu",
    assets: str | Path | None = None,
    full: bool = False,
    progress: bool = False,
    **overrides: object,
) -> QuantizationResult:
    """Load a zoo model and quantize it by `method` (minmax, percentile, dobi, 2dquant); the CLI's `quantize`.

    Calibration crops come from `calib` (default: `<assets>/calibration/train291`), never a benchmark set.
    """
    root = asset_dir(assets)
    folder = Path(calib) if calib is not None else root / "calibration" / "train291"
    model = load_model(name, scale, assets)
    spec = QuantSpec(w_bits=w_bits, a_bits=a_bits, full=full)
    return quantize_model(
        model, get_entry(name).layout, method, spec, folder, preset, root / "datasets", progress, **overrides
    )


def upscale_image(model: nn.Module, image: np.ndarray | str | Path, tile: int | None = None) -> np.ndarray:
    """Super-resolve an HxWx3 uint8 image (or an image file) to an (sH)x(sW)x3 uint8 image."""
    lr = read_image(image) if isinstance(image, str | Path) else image
    return to_uint8(upscale(model, to_tensor(lr), tile=tile))


def upscale_file(model: nn.Module, src: str | Path, dst: str | Path, tile: int | None = None) -> None:
    """Read an image file, super-resolve it and write the result."""
    write_image(dst, upscale_image(model, src, tile))


def write_lr_set(dataset: str, scale: int, out: str | Path, assets: str | Path | None = None) -> list[Path]:
    """Write the bicubic LR images of a benchmark as `<name>x<s>.png` (the benchmarks' own file names)."""
    bench = BenchmarkSet.from_assets(dataset, assets)
    written = []
    for pair in bench.iter_pairs(scale):
        path = Path(out) / f"{pair.name}x{scale}.png"
        write_image(path, pair.lr)
        written.append(path)
    return written


__all__ = [
    "DatasetResult",
    "evaluate",
    "load_model",
    "quantize",
    "upscale",
    "upscale_file",
    "upscale_image",
    "write_lr_set",
]
