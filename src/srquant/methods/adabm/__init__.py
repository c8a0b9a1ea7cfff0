"""AdaBM (Hong & Lee, CVPR 2024): image- and layer-adaptive activation bits, fitted in seconds from LR crops.

1. `quantize_` with a symmetric weight quantizer; the adaptive layers are the layout's body (with `full`,
   head/upsampler/tail run at a fixed, non-adaptive W8A8).
2. Calibration (`calibration`): weight bounds by MSE search, activation ranges by EMA min/max, Image2Bit
   thresholds and Layer2Bit measures from the calibration crops. Then bit-aware clipping once.
3. Fine-tuning (`finetune`): phase-cycled distillation of weight bounds, activation bounds and bit measures.
4. The model is evaluated as an `AdaptiveBitsModel` (`controller`): every image gets its own bits.

With `allocation="measured"` (srquant's `cpu` and `gpu` presets; `allocation`) steps 2 and 3 run with both
adaptations off, so they give exactly the fixed-bit twin, and the bits are then chosen on that tuned model from
what moving each layer by up to `layer_range` bits (its range clipped for the new bit) and every image by one
does to the output error on calibration crops, each change kept only if held-out crops confirm it.

Departures from the released code: max|W| for the weight search; the model stays in eval mode throughout (the
original's train-mode calibration would move BatchNorm statistics); a divergence guard rolls back every
trainable method parameter (the original can collapse to about 6 dB when the weight bounds blow up); no
test-set model selection. The weight grid has 2^(b-1)-1 steps per side with zero exact (15 levels at 4 bits);
the original rounds (w+u)/2u * (2^b-1), 16 levels without zero. Evaluation is whole-image with one image bit
per image; the original's body-only protocol scores 96x96 LR patches with a bit per patch.

Ablation switches (`AdaBMConfig.image2bit`, `layer2bit`, `bit_aware_clipping`): with `image2bit=False` b_img is 0
for every image and the thresholds are neither calibrated nor trained; with `layer2bit=False` b_layer is 0 and the
layer measures are neither calibrated nor trained (the sensitivities are still recorded). With both off the
method is fixed-bit at the base with the same quantizer, calibration, BaC and weight/activation fine-tuning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from srquant.errors import SrquantError
from srquant.methods.adabm.allocation import AllocationReport, measured_allocation
from srquant.methods.adabm.calibration import bit_aware_clipping, calibrate_adabm, search_weight_bound
from srquant.methods.adabm.config import ADABM_PRESETS, AdaBMConfig
from srquant.methods.adabm.controller import AdaptiveBitsModel, BitController, bit_report, image_complexity
from srquant.methods.adabm.finetune import PHASES, fine_tune
from srquant.methods.base import CalibrationData, Method, MethodRun
from srquant.models.layout import QuantLayout
from srquant.quant.quantize import QuantReport, quantize_
from srquant.quant.spec import QuantSpec, matches

log = logging.getLogger(__name__)

__all__ = [
    "ADABM_PRESETS",
    "PHASES",
    "AdaBM",
    "AdaBMConfig",
    "AdaBMResult",
    "AllocationReport",
    "AdaptiveBitsModel",
    "BitController",
    "bit_aware_clipping",
    "bit_report",
    "calibrate_adabm",
    "fine_tune",
    "image_complexity",
    "measured_allocation",
    "run_adabm",
    "search_weight_bound",
]


@dataclass
class AdaBMResult:
    """A network quantized and fitted by AdaBM: the model to evaluate (network + bit controller) and the run."""

    model: AdaptiveBitsModel
    report: QuantReport
    spec: QuantSpec
    adaptive_layers: tuple[str, ...]
    config: AdaBMConfig
    losses: list[float] = field(default_factory=list)
    phases: list[str] = field(default_factory=list)
    rollbacks: list[str] = field(default_factory=list)
    stopped_early: bool = False
    calib_seconds: float = 0.0
    seconds: float = 0.0
    allocation: AllocationReport | None = None

    @property
    def controller(self) -> BitController:
        """The fitted bit controller."""
        return self.model.controller


@contextlib.contextmanager
def adaptation_off(controller: BitController) -> Iterator[None]:
    """Both adaptations switched off for a while (the fixed-bit twin's fine-tuning), then back as they were."""
    saved = controller.image2bit, controller.layer2bit
    controller.image2bit = controller.layer2bit = False
    try:
        yield
    finally:
        controller.image2bit, controller.layer2bit = saved


def run_adabm(
    network: nn.Module,
    layout: QuantLayout,
    spec: QuantSpec,
    draw_batch: Callable[[int], torch.Tensor],
    config: AdaBMConfig,
    progress: bool = False,
) -> AdaBMResult:
    """Quantize `network` in place at the spec's bits (symmetric weights, the spec's granularity), calibrate it
    and fit AdaBM's bounds and bit measures from LR crops; `draw_batch(n)` returns n LR crops in [0, 1].

    The calibration crops are the stream's first `calib_count`; the model returned runs the network with every
    image's own bits.
    """
    reach = config.layer_range + int(config.image2bit)  # layer offsets plus the image bit
    if not 1 + reach <= spec.a_bits <= 16 - reach:
        raise SrquantError(
            f"AdaBM with layer_range {config.layer_range} needs base activation bits in [{1 + reach}, {16 - reach}] "
            f"(bits vary by +-{reach}), got {spec.a_bits}"
        )
    if not 2 <= spec.w_bits <= 16:
        raise SrquantError(f"AdaBM's symmetric weight quantizer needs w_bits in [2, 16], got {spec.w_bits}")
    if spec.output_bits is not None:
        raise SrquantError("AdaBM's bits change per image: --output-bits/--glue-bits (integer export) do not apply")
    start = time.perf_counter()
    spec = dataclasses.replace(spec, weight_quantizer="symmetric", act_quantizer="asymmetric", matmul=False)
    network.eval()
    report = quantize_(network, spec, layout)
    adaptive = tuple(name for name in report.layers if matches(name, layout.body))
    if not adaptive:
        raise SrquantError("AdaBM found no adaptive layers: the layout's body matched nothing")
    device = next((p.device for p in network.parameters()), torch.device("cpu"))
    controller = BitController(adaptive, spec.a_bits, config.image2bit, config.layer2bit, config.layer_range)
    controller = controller.to(device)
    sizes = [min(config.calib_batch, config.calib_count - i) for i in range(0, config.calib_count, config.calib_batch)]
    calib = [draw_batch(n) for n in sizes]
    calibrate_adabm(network, controller, calib, config)
    measured = config.allocation == "measured" and (controller.layer2bit or controller.image2bit)
    if measured:  # fine-tune the fixed-bit twin first; the bits are measured on the tuned model (`allocation`)
        with torch.no_grad():
            controller.measure_layer.zero_()
            controller.image_direction.zero_()
    model = AdaptiveBitsModel(network, controller)
    if config.bit_aware_clipping:
        bit_aware_clipping(model, draw_batch(config.batch_size), config)
    calib_seconds = time.perf_counter() - start
    with adaptation_off(controller) if measured else contextlib.nullcontext():
        tuned = fine_tune(model, calib, draw_batch, config, progress)
    allocation = None
    if measured:
        allocating = time.perf_counter()
        crops, n = torch.cat(calib), config.scoring_crops  # the config ensures 2n <= calib_count
        allocation = measured_allocation(network, controller, crops[:n], crops[n : 2 * n], reclip=config.reclip)
        calib_seconds += time.perf_counter() - allocating
    result = AdaBMResult(model, report, spec, adaptive, config, calib_seconds=calib_seconds, allocation=allocation)
    result.losses, result.phases, result.rollbacks = tuned.losses, tuned.phases, tuned.rollbacks
    result.stopped_early = tuned.stopped_early
    result.seconds = time.perf_counter() - start
    return result


class AdaBM(Method):
    """Per-image, per-layer activation bits around the base a_bits; symmetric weights at w_bits."""

    name = "adabm"
    summary = "AdaBM: image- and layer-adaptive activation bits around a base, fitted from LR crops"
    config_type = AdaBMConfig
    presets = ADABM_PRESETS
    dynamic = True

    def fixed_twin(self, a_bits: int) -> dict[str, Any]:
        """Image2Bit and Layer2Bit off: every image and layer at the base a_bits."""
        return {"image2bit": False, "layer2bit": False}

    def run(
        self,
        model: nn.Module,
        layout: QuantLayout,
        spec: QuantSpec,
        data: CalibrationData,
        config: AdaBMConfig,
        progress: bool = False,
    ) -> MethodRun:
        crop = data.rounded(config.crop)
        available = data.fitting_size(crop)
        if available < crop:
            log.warning("AdaBM crops of %d px do not fit the calibration images; using %d px", crop, available)
            crop = max(data.pad_multiple, available // data.pad_multiple * data.pad_multiple)
        result = run_adabm(model, layout, spec, data.stream(crop, config.seed), config, progress)
        settings = {"adabm": self.settings(config), "crop": crop, "crop_requested": config.crop}
        if result.allocation is not None:
            settings["allocation"] = dataclasses.asdict(result.allocation)
        state = {"controller": result.controller.state_dict()}
        return MethodRun(
            result.model, result.report, result.spec, result.seconds, settings, state, result.rollbacks, result.losses
        )

    def inference_model(self, network: nn.Module, state: dict[str, Any] | None) -> nn.Module:
        if not state or "controller" not in state:
            raise SrquantError("an AdaBM checkpoint must hold its bit controller")
        device = next((p.device for p in network.parameters()), torch.device("cpu"))
        return AdaptiveBitsModel(network, BitController.from_state(state["controller"]).to(device))


ADABM = AdaBM()
