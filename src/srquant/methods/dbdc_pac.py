"""DBDC+Pac (Tu et al., "Toward Accurate Post-Training Quantization for Image Super Resolution", CVPR 2023:
PTQ4SR), the baseline of 2DQuant's Table 3.

1. `quantize_`; weights asymmetric per output channel (the released configs' `per_channel: true`).
2. DBDC, density-based dual clipping (`DensityClipCalibrator`): each activation's per-batch histogram is trimmed
   from its sparser end until at most a share of 1e-4 (1e-5 at 8 bits) of the values is cut; the kept ranges are
   averaged over the calibration batches. Weights keep their per-channel min/max.
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
- the divergence guard of every srquant method watches both phases.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from srquant.errors import SrquantError
from srquant.methods.base import CalibrationData, Method, MethodRun
from srquant.methods.ptq import calibrate
from srquant.methods.training import DivergenceGuard, frozen_weights
from srquant.models.layout import QuantLayout
from srquant.quant.calibrators import is_weight_quantizer
from srquant.quant.quantize import fp_mode, quantize_, quantizers
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


def _phase(
    model: nn.Module,
    params: list[nn.Parameter],
    draw: Callable[[int], torch.Tensor],
    config: DBDCPacConfig,
    lr: float,
    lr_end: float,
    label: str,
    progress: bool,
) -> list[str]:
    """Adam on `params` for `iterations` steps, cosine from `lr` to `lr_end`, L1 to the float network's output."""
    if not params or config.iterations == 0:
        return []
    optimizer = torch.optim.Adam(params, lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.iterations, eta_min=lr_end)

    def loss_of(batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), fp_mode(model):
            target = model(batch)
        return F.l1_loss(model(batch), target)

    with torch.no_grad():
        seeds = [float(loss_of(draw(config.batch_size))) for _ in range(4)]
    guard = DivergenceGuard(params, config.blowup_factor, config.max_rollbacks, seeds)
    with frozen_weights(model, params):
        for step in tqdm(range(config.iterations), desc=label, disable=not progress, leave=False):
            loss = loss_of(draw(config.batch_size))
            if not guard.admit(float(loss.detach()), f"{label} step {step}", optimizer):
                if guard.stopped:
                    break
                continue
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            guard.record(float(loss.detach()))
        with torch.no_grad():
            guard.final_check(float(loss_of(draw(config.batch_size))))
    return guard.rollbacks


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
        notes = _phase(model, acts, draw, config, config.lr_act, config.lr_act_end, "Pac activations", progress)
        notes += _phase(model, weights, draw, config, config.lr_weight, config.lr_weight_end, "Pac weights", progress)
        settings = {"dbdc_pac": self.settings(config), "calib_size": size}
        return MethodRun(model, report, spec, time.perf_counter() - start, settings, None, notes)
