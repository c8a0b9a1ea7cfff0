"""Post-training calibration of bounds: MinMax, Percentile and DOBI (2DQuant's first stage).

Statistics are collected with quantization off (the FP network's tensors, as 2DQuant does), over every
calibration batch; then each quantizer gets its bounds and quantization is switched on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn
from tqdm import tqdm

from srquant.errors import SrquantError
from srquant.quant.calibrators import DobiCalibrator, MinMaxCalibrator, PercentileCalibrator, RangeCalibrator
from srquant.quant.quantize import mode_scope, quantizers, set_mode
from srquant.quant.quantizers import AsymmetricQuantizer, LSQQuantizer, Quantizer, QuantMode

PTQ_METHODS = ("minmax", "percentile", "dobi")
log = logging.getLogger(__name__)


def make_calibrator(method: str, name: str, quantizer: Quantizer, percentile: float) -> RangeCalibrator:
    """The calibrator a method uses for one quantizer."""
    groups = quantizer.groups if isinstance(quantizer, AsymmetricQuantizer) else 1
    if method == "minmax" or isinstance(quantizer, LSQQuantizer):
        return MinMaxCalibrator(name, groups)
    if method == "percentile":
        return PercentileCalibrator(name, groups, percentile)
    if method == "dobi":
        one_sided = isinstance(quantizer, AsymmetricQuantizer) and quantizer.one_sided
        return DobiCalibrator(name, groups, bits=quantizer.bits, one_sided=one_sided)
    raise SrquantError(f"unknown calibration method {method!r}; choose from {', '.join(PTQ_METHODS)}")


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    method: str = "dobi",
    percentile: float = 99.99,
    progress: bool = False,
) -> None:
    """Set every quantizer's bounds by `method` from the model's FP tensors on `batches`, then enable them."""
    if not batches:
        raise SrquantError("calibration needs at least one batch")
    named = list(quantizers(model))
    if not named:
        raise SrquantError("the model has no quantizers: call quantize_ first")
    calibrators = {name: make_calibrator(method, name, q, percentile) for name, q in named}
    for name, q in named:
        q.calibrator = calibrators[name]
    passes = max(c.passes for c in calibrators.values())
    was_training = model.training
    model.eval()
    try:
        with mode_scope(model, QuantMode.CALIBRATE):
            for index in range(passes):
                for cal in calibrators.values():
                    cal.begin_pass(index)
                desc = f"{method} pass {index + 1}/{passes}"
                for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
                    model(batch)
    finally:
        for _, q in named:
            q.calibrator = None
        model.train(was_training)
    unused = []
    for name, q in named:
        if not calibrators[name].saw_data():
            unused.append(name)
            continue
        lower, upper = calibrators[name].compute()
        if isinstance(q, LSQQuantizer):
            q.set_range(lower, upper)
            continue
        try:
            q.set_bounds(lower, upper)  # type: ignore[attr-defined]
        except FloatingPointError as err:
            raise SrquantError(f"calibration of {name} produced invalid bounds: {err}") from None
    set_mode(model, QuantMode.QUANT)
    for name, q in named:
        if name in unused:
            q.mode = QuantMode.FP  # never reached (a branch for another scale): left in floating point
    if unused:
        log.info("%d quantizers saw no calibration data and stay FP (first: %s)", len(unused), unused[0])
