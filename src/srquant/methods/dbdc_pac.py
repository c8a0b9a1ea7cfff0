"""DBDC+Pac (Tu et al., "Toward Accurate Post-Training Quantization for Image Super Resolution", CVPR 2023:
PTQ4SR), the baseline of 2DQuant's Table 3.

1. `quantize_`; weights asymmetric per output channel (the released configs' `per_channel: true`).
2. DBDC, density-based dual clipping (`DensityClipCalibrator`): whole end bins of each activation's per-batch
   histogram are cut, the sparser end first, until no more than a share 1 - 1e-4 (1 - 1e-5 at 8 bits) of the
   values is kept; the kept ranges are averaged over the calibration batches. Weights keep their per-channel min/max.
3. Pac, pixel-aware calibration against the FP network on LR crops: first the activation bounds (Adam, learning
   rate 5e-3 cosine-annealed to 2e-3), then the weight bounds (5e-6 to 2e-6), each for `iterations` steps of
   batch 2, with the L1 distance between the quantized and the float network's outputs.

Departures, written down because the paper's own text could not be read here (docs/quantization.md):
- the loss is the output L1 only: the released code's feature term is computed from detached tensors, so it never
  sends a gradient, and no per-pixel weighting could be found in the code;
- the layers quantized are the network's srquant layout (the body by default, head and tail with `--full`), as for
  every other method in srquant's tables; the released configs keep the first and last convs at W8A8;
- a kept range runs from the left edge of its first kept histogram bin (the code adds one bin on that side too);
- the bounds' gradients are not rescaled (the code scales them LSQ-style, which Adam normalises away anyway);
- each phase runs as srquant's distillation loop (`run_dqc` without stage features or augmentation), so the
  divergence guard of every srquant method watches both.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from torch import nn

from srquant.errors import SrquantError
from srquant.methods.base import CalibrationData, Method, MethodRun
from srquant.methods.ptq import calibrate
from srquant.methods.twodquant import TwoDQuantConfig, run_dqc
from srquant.models.layout import QuantLayout
from srquant.quant.calibrators import is_weight_quantizer
from srquant.quant.quantize import quantize_, quantizers
from srquant.quant.spec import QuantSpec


@dataclass(frozen=True)
class DBDCPacConfig:
    """DBDC's calibration batches and Pac's two phases."""

    calib_batches: int = 30
    calib_batch: int = 16
    calib_size: int = 48  # LR crops (the configs' 192 px HR at x4)
    iterations: int = 250  # per phase
    batch_size: int = 2
    crop: int = 48
    lr_act: float = 5e-3
    lr_act_end: float = 2e-3
    lr_weight: float = 5e-6
    lr_weight_end: float = 2e-6
    seed: int = 0
    blowup_factor: float = 4.0
    max_rollbacks: int = 5

    def __post_init__(self) -> None:
        if min(self.calib_batches, self.calib_batch, self.calib_size, self.batch_size, self.crop) < 1:
            raise SrquantError("dbdc-pac needs positive calibration counts, batches and crops")
        if self.iterations < 0 or min(self.lr_act, self.lr_act_end, self.lr_weight, self.lr_weight_end) <= 0:
            raise SrquantError("dbdc-pac needs iterations >= 0 and positive learning rates")


DBDC_PAC_PRESETS = {
    # The released code's x4 configs: 30 DBDC batches of 16 LR crops of 48 px; Pac 250 + 250 steps of batch 2.
    "paper": DBDCPacConfig(),
    "code": DBDCPacConfig(),
    # CPU: 4 DBDC batches of 8 crops; 100 + 100 Pac steps.
    "cpu": DBDCPacConfig(calib_batches=4, calib_batch=8, iterations=100),
    "gpu": DBDCPacConfig(),
}


def pac_schedule(config: DBDCPacConfig, lr: float, lr_end: float) -> TwoDQuantConfig:
    """One Pac phase as a distillation schedule: L1 to the float output only, cosine from `lr` to `lr_end`."""
    return TwoDQuantConfig(
        iterations=config.iterations,
        batch_size=config.batch_size,
        lr=lr,
        lr_end=lr_end,
        feature_weight=0.0,
        augment=False,
        seed=config.seed,
        blowup_factor=config.blowup_factor,
        max_rollbacks=config.max_rollbacks,
    )


class DBDCPac(Method):
    """PTQ4SR: density-based dual clipping of activations, then pixel-aware calibration of the bounds."""

    name = "dbdc-pac"
    summary = "PTQ4SR: density-based dual clipping, then the bounds calibrated against the FP output (Pac)"
    config_type = DBDCPacConfig
    presets = DBDC_PAC_PRESETS

    def default_granularity(self, preset: str) -> str:
        """Per-channel weights in every preset: the released configs use them."""
        return "channel"

    def run(
        self,
        model: nn.Module,
        layout: QuantLayout,
        spec: QuantSpec,
        data: CalibrationData,
        config: DBDCPacConfig,
        progress: bool = False,
    ) -> MethodRun:
        start = time.perf_counter()
        model.eval()
        report = quantize_(model, spec, layout)
        size = data.rounded(config.calib_size)
        batches = data.batches(config.calib_batches * config.calib_batch, size, config.calib_batch, config.seed)
        calibrate(model, batches, "dbdc", progress=progress)
        draw = data.stream(data.rounded(config.crop), config.seed + 1)
        named = list(quantizers(model))
        acts = [p for n, q in named if not is_weight_quantizer(n) for p in q.parameters()]
        weights = [p for n, q in named if is_weight_quantizer(n) for p in q.parameters()]
        notes = []
        for params, lr, lr_end in (
            (acts, config.lr_act, config.lr_act_end),
            (weights, config.lr_weight, config.lr_weight_end),
        ):
            if params and config.iterations:
                notes += run_dqc(model, draw, pac_schedule(config, lr, lr_end), progress, params=params).rollbacks
        settings = {"dbdc_pac": self.settings(config), "calib_size": size}
        return MethodRun(model, report, spec, time.perf_counter() - start, settings, None, notes)
