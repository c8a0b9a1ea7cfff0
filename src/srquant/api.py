"""The Python API in a few calls: load a zoo model, upscale an image, evaluate on benchmarks, make LR sets."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from srquant.assets import asset_dir
from srquant.data.benchmark import BenchmarkSet
from srquant.data.calibration import CropSampler
from srquant.data.io import read_image, to_tensor, to_uint8, write_image
from srquant.deploy.onnx_export import ExportReport, export_onnx
from srquant.deploy.speed import SpeedReport, bench_onnxruntime
from srquant.errors import SrquantError
from srquant.evaluate import DatasetResult, evaluate
from srquant.methods.dynamic import DynamicController, eval_hooks, load_dynamic
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
    weight_quantizer: str = "asymmetric",
    output_bits: int | None = None,
    glue_bits: int | None = None,
    **overrides: object,
) -> QuantizationResult:
    """Load a zoo model and quantize it by `method` (see `METHODS`, e.g. 2dquant, adabm, granular-dq).

    The CLI's `quantize`; write the result with `save_quantized(result.model, ..., result.spec, meta,
    result.dynamic)`.

    Calibration crops come from `calib` (default: `<assets>/calibration/train291`), never a benchmark set.
    """
    root = asset_dir(assets)
    folder = Path(calib) if calib is not None else root / "calibration" / "train291"
    model = load_model(name, scale, assets)
    spec = QuantSpec(
        w_bits, a_bits, full=full, weight_quantizer=weight_quantizer, output_bits=output_bits, glue_bits=glue_bits
    )
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
    "bench_speed",
    "evaluate",
    "export_quantized",
    "load_model",
    "quantize",
    "upscale",
    "upscale_file",
    "upscale_image",
    "write_lr_set",
]


def load_quantized_model(path: str | Path) -> tuple[nn.Module, dict[str, Any], DynamicController | None]:
    """A quantized checkpoint with its dynamic-bit controller restored: (model, record, controller or None)."""
    return load_dynamic(path)


def evaluate_quantized(
    path: str | Path,
    datasets: list[str],
    scale: int,
    conventions: tuple[str, ...] = ("basicsr",),
    assets: str | Path | None = None,
    progress: bool = False,
    bit_log: dict[str, dict[str, dict[str, Any]]] | None = None,
    bitmap_dir: str | Path | None = None,
) -> list[DatasetResult]:
    """Evaluate a quantized checkpoint as `srquant eval --model PATH` does.

    Dynamic-bit models report per-image `fab` and `bitops_g` (averaged in `extras`); Granular-DQ models run
    patch-wise (96 px LR patches, step 90). `bit_log[dataset][image]` receives each image's bits; with
    `bitmap_dir`, Granular-DQ bit maps are written to `bitmap_dir/<dataset>/<image>.png`.
    """
    model, _, controller = load_dynamic(path)
    results = []
    for dataset in datasets:
        log = bit_log.setdefault(dataset, {}) if bit_log is not None and controller is not None else None
        maps = Path(bitmap_dir) / dataset if bitmap_dir is not None else None
        upscaler, measure = eval_hooks(model, controller, scale, log, maps)
        results += evaluate(model, [dataset], scale, conventions, assets, None, progress, measure, upscaler)
    return results


def _fixed_bit_model(path: str | Path) -> nn.Module:
    """A quantized checkpoint that has one static integer graph; dynamic-bit models are refused in one line."""
    model, record, controller = load_dynamic(path)
    if controller is not None:
        method = record.get("meta", {}).get("method", "a dynamic method")
        raise SrquantError(
            f"{path} is a dynamic-bit model ({method}): its bits change per image or patch, and onnxruntime has no "
            "per-sample bit switching; export a fixed-bit model (docs/deploy.md)"
        )
    return model


def calibration_inputs(
    scale: int, calib: str | Path | None = None, assets: str | Path | None = None, count: int = 16, size: int = 64
) -> list[torch.Tensor] | None:
    """LR crops from the calibration folder (default `<assets>/calibration/train291`), or None if absent."""
    try:
        root = asset_dir(assets)
    except SrquantError:
        if calib is None:
            return None
        root = None
    folder = Path(calib) if calib is not None else root / "calibration" / "train291"  # type: ignore[operator]
    if not folder.is_dir():
        return None
    datasets = root / "datasets" if root is not None else None
    crops, _ = CropSampler(folder, scale, size, datasets).draw(count, np.random.default_rng(0))
    return list(crops.split(4))


def export_quantized(
    path: str | Path,
    out: str | Path,
    size: tuple[int, int] | None = None,
    calib: str | Path | None = None,
    assets: str | Path | None = None,
) -> ExportReport:
    """`srquant export`: a fixed-bit A8 checkpoint as an integer QDQ ONNX graph for onnxruntime."""
    model = _fixed_bit_model(path)
    return export_onnx(model, out, calibration_inputs(int(model.scale), calib, assets), size)


def bench_speed(
    path: str | Path,
    size: tuple[int, int] = (256, 256),
    threads: int | None = None,
    runs: int = 10,
    assets: str | Path | None = None,
    calib: str | Path | None = None,
    psnr_dataset: str | None = "Set5",
) -> SpeedReport:
    """`srquant bench-speed`: integer vs fastest FP32 onnxruntime latency, peak memory, and the PSNR change."""
    model = _fixed_bit_model(path)
    scale = int(model.scale)

    def psnr(upscaler: Any) -> float:
        return evaluate(model, [psnr_dataset], scale, ["basicsr"], assets, progress=False, upscaler=upscaler)[0].psnr

    return bench_onnxruntime(
        model,
        size,
        threads or os.cpu_count() or 1,
        runs,
        calibration_inputs(scale, calib, assets),
        psnr if psnr_dataset else None,
    )
