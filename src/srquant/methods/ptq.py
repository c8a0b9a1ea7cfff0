"""Post-training calibration of ranges: MinMax, Percentile and DOBI (2DQuant's first stage).

Statistics are collected with quantization off (the FP network's tensors, as 2DQuant does), over every
calibration batch; then each quantizer gets its range (per row: per tensor or per output channel) and
quantization is switched on. Calibration data: 32 LR crops of 64x64 (2DQuant, section 4.1) in every preset.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from srquant.errors import SrquantError
from srquant.methods.base import CalibrationData, Method, MethodRun
from srquant.methods.bias_correction import correct_biases
from srquant.models.layout import QuantLayout
from srquant.quant.calibrators import apply_ranges, calibrator_factory, is_weight_quantizer, run_calibration
from srquant.quant.quantize import quantize_, quantizers
from srquant.quant.spec import QuantSpec


@dataclass(frozen=True)
class PTQConfig:
    """Calibration data of the range methods (how many LR crops, how large, in which batches, which seed) and
    whether biases are corrected afterwards."""

    calib_count: int = 32
    calib_size: int = 64
    calib_batch: int = 8
    percentile: float = 99.99
    seed: int = 0
    bias_correction: bool = False  # shift each layer's bias by its mean output error (methods/bias_correction.py)

    def __post_init__(self) -> None:
        if min(self.calib_count, self.calib_size, self.calib_batch) < 1:
            raise SrquantError("calibration count, crop size and batch must be positive")
        if not 50.0 < self.percentile <= 100.0:
            raise SrquantError(f"percentile must be in (50, 100], got {self.percentile}")


PTQ_PRESETS = {"paper": PTQConfig(), "code": PTQConfig(), "cpu": PTQConfig(), "gpu": PTQConfig()}


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    kind: str = "dobi",
    percentile: float = 99.99,
    progress: bool = False,
) -> list[str]:
    """Set every quantizer's range by `kind` (minmax, percentile, dobi, dbdc) from the FP tensors on `batches` and
    switch quantization on; returns the quantizers no batch reached (they stay FP)."""
    named = list(quantizers(model))
    if not named:
        raise SrquantError("the model has no quantizers: call quantize_ first")
    factory = calibrator_factory(kind, percentile)
    calibrators = {name: factory(name, q, is_weight_quantizer(name)) for name, q in named}
    run_calibration(model, batches, calibrators, progress, kind)
    return apply_ranges(model, calibrators)


class RangeCalibration(Method):
    """A method that only calibrates ranges (MinMax, Percentile, DOBI): quantize_, one calibration, done."""

    config_type = PTQConfig
    presets = PTQ_PRESETS

    def __init__(self, name: str, kind: str, summary: str) -> None:
        self.name, self.kind, self.summary = name, kind, summary  # type: ignore[misc]

    def run(
        self,
        model: nn.Module,
        layout: QuantLayout,
        spec: QuantSpec,
        data: CalibrationData,
        config: PTQConfig,
        progress: bool = False,
    ) -> MethodRun:
        start = time.perf_counter()
        report = quantize_(model, spec, layout)
        size = data.rounded(config.calib_size)
        batches = data.batches(config.calib_count, size, config.calib_batch, config.seed)
        calibrate(model, batches, self.kind, config.percentile, progress)
        settings: dict[str, object] = {"calib_count": config.calib_count, "calib_size": size}
        if config.bias_correction:
            settings["bias_corrected"] = len(correct_biases(model, batches, progress))
        if self.kind == "percentile":
            settings["percentile"] = config.percentile
        return MethodRun(model, report, spec, time.perf_counter() - start, settings)


MINMAX = RangeCalibration("minmax", "minmax", "ranges from the minimum and maximum of the calibration tensors")
PERCENTILE = RangeCalibration("percentile", "percentile", "ranges from the 0.01/99.99 percentiles per batch")
DOBI = RangeCalibration("dobi", "dobi", "2DQuant's DOBI: the least-L2-error range among 100 candidates")
