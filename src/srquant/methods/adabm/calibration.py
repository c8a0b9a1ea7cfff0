"""AdaBM's calibration: weight bounds by MSE search, activation ranges by EMA min/max, Image2Bit thresholds,
Layer2Bit sensitivities; then bit-aware clipping (BaC) once, at each layer's own bit.

Weight bounds: a 50-point MSE search over u = max|W| * (1 - 0.01 i), per row of the weight quantizer (per output
channel or per tensor). Deliberate fix: the released code starts from max(W), which under-covers weights whose
largest magnitude is negative.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from srquant.errors import SrquantError
from srquant.methods.adabm.config import AdaBMConfig
from srquant.methods.adabm.controller import AdaptiveBitsModel, BitController, image_complexity
from srquant.quant.calibrators import EMAMinMaxCalibrator, apply_ranges, best_range, run_calibration
from srquant.quant.modules import is_quantized
from srquant.quant.quantizers import Quantizer, QuantMode

log = logging.getLogger(__name__)


class SensitivityCalibrator(EMAMinMaxCalibrator):
    """EMA min/max (AdaBM's activation init) plus Layer2Bit's sensitivity: the mean per-sample std of the input."""

    def __init__(self, name: str, quantizer: Quantizer, beta: float) -> None:
        super().__init__(name, quantizer, beta=beta)
        self.std_sum = 0.0
        self.batches = 0

    def collect(self, x: torch.Tensor) -> None:
        super().collect(x)
        x = x.float()
        self.std_sum += float(x.flatten(1).std(dim=1).mean()) if x.dim() > 1 and x[0].numel() > 1 else 0.0
        self.batches += 1

    def sensitivity(self) -> float:
        """Mean over batches of the per-sample std of the layer's input."""
        return self.std_sum / max(self.batches, 1)


@torch.no_grad()
def search_weight_bound(quantizer: Quantizer, weight: torch.Tensor, candidates: int = 50) -> torch.Tensor:
    """Set each row's bound to the MSE-best of u = max|W| * (1 - 0.01 i), i < candidates; returns the bounds."""
    rows = weight.detach().float().reshape(quantizer.rows, -1)
    top = rows.abs().amax(dim=1).clamp_min(1e-8)
    bounds = top[:, None] * (1 - 0.01 * torch.arange(candidates, device=rows.device, dtype=rows.dtype))[None, :]
    low, high, _ = best_range(quantizer, rows, -bounds, bounds)
    quantizer.set_range(low, high)
    return high


@torch.no_grad()
def calibrate_adabm(
    network: nn.Module, controller: BitController, batches: Sequence[torch.Tensor], config: AdaBMConfig
) -> None:
    """Weight bounds by MSE search; activation ranges, Image2Bit thresholds and Layer2Bit measures by EMA stats."""
    layers = [(n, m) for n, m in network.named_modules() if is_quantized(m)]
    for _, module in layers:
        search_weight_bound(module.weight_quantizer, module.weight, config.weight_candidates)
    cals = {f"{n}.input_quantizer": SensitivityCalibrator(n, m.input_quantizer, config.ema_beta) for n, m in layers}
    run_calibration(network, batches, cals, label="AdaBM calibration")
    if controller.image2bit:
        low_q, high_q = config.img_percentile / 100, 1 - config.img_percentile / 100
        lower = upper = None
        for batch in batches:
            c = image_complexity(batch)
            lo, hi = float(torch.quantile(c, low_q)), float(torch.quantile(c, high_q))
            if lower is None or upper is None:
                lower, upper = lo, hi
            else:
                lower = config.ema_beta * lower + (1 - config.ema_beta) * lo
                upper = config.ema_beta * upper + (1 - config.ema_beta) * hi
        assert lower is not None and upper is not None
        controller.measure_l.fill_(lower)
        controller.measure_u.fill_(max(upper, lower + 1e-3))
    unused = {name.rpartition(".")[0] for name in apply_ranges(network, cals)}
    missing = [name for name in controller.layer_names if name in unused]
    if missing:
        raise SrquantError(f"adaptive layer {missing[0]} saw no data")
    for name, module in layers:  # a layer no batch reached (an upsampler of another scale) stays FP
        module.weight_quantizer.mode = QuantMode.FP if name in unused else QuantMode.QUANT
    sens = torch.tensor([cals[f"{n}.input_quantizer"].sensitivity() for n in controller.layer_names])
    controller.sensitivity.copy_(sens.to(controller.sensitivity.device))
    if controller.layer2bit:
        q = config.layer_percentile / 100
        low, high = torch.quantile(sens, q), torch.quantile(sens, 1 - q)
        controller.measure_layer.copy_(((sens > high).float() - (sens < low).float()).to(controller.sensitivity.device))


@torch.no_grad()
def bit_aware_clipping(model: AdaptiveBitsModel, batch: torch.Tensor, config: AdaBMConfig) -> None:
    """BaC: per adaptive layer, grid (l, u) * (1 - 0.01 i) at bit base + b_layer, MSE; blend with the current range.

    Runs inside one quantized forward pass, each layer just before it quantizes, so later layers see inputs
    already produced with the clipped ranges of earlier ones (as the original's first-step BaC does).
    """
    controller = model.controller
    layer_bits_hard = (controller.base_bits + controller.layer_bits()).round().to(torch.int64).tolist()
    scales = 1 - 0.01 * torch.arange(config.bac_candidates, dtype=torch.float64, device=batch.device)
    handles = []
    for quantizer, bits in zip(model.adaptive_quantizers(), layer_bits_hard, strict=True):

        def hook(q: Quantizer, args: tuple, bits: int = bits) -> None:
            saved, q.bits_override = q.bits_override, None
            lo, hi = (float(v) for v in q.value_range())
            q.bits_override = saved
            values = args[0].detach().double().reshape(1, -1)
            _, _, index = best_range(q, values, lo * scales[None, :], hi * scales[None, :], bits=bits)
            shrink = float(scales[int(index)])
            beta = config.bac_blend
            q.set_range(beta * lo + (1 - beta) * lo * shrink, beta * hi + (1 - beta) * hi * shrink)

        handles.append(quantizer.register_forward_pre_hook(hook))
    try:
        model(batch)
    finally:
        for handle in handles:
            handle.remove()
