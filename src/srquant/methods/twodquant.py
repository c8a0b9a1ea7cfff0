"""2DQuant (Liu et al., NeurIPS 2024): DOBI range search, then Distillation Quantization Calibration (DQC).

DQC trains only the quantizer bounds with Adam, the network weights frozen. The teacher is the same network
with quantization switched off (eval mode), so no HR image is needed: the loss is
    L = L1(student output, teacher output) + lambda * sum over stages of F(student stage, teacher stage),
where F is the mean squared distance of the per-sample L2-normalised stage features (each sample
normalised on its own; the released code's normalisation broadcast across the batch, which is not copied).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from srquant.errors import SrquantError
from srquant.methods.base import CalibrationData, Method, MethodRun
from srquant.methods.ptq import calibrate
from srquant.methods.training import (
    DivergenceGuard,
    capture_stages,
    dihedral,
    distillation_loss,
    frozen_weights,
    random_dihedral,
)
from srquant.models.layout import QuantLayout
from srquant.quant.quantize import bound_parameters, quantize_
from srquant.quant.spec import QuantSpec


@dataclass(frozen=True)
class TwoDQuantConfig:
    """DOBI's calibration crops and the DQC schedule; `TWODQUANT_PRESETS` holds the paper's, the code's, a CPU one."""

    calib_count: int = 32
    calib_size: int = 64
    calib_batch: int = 8
    crop: int = 64  # DQC's LR crops
    iterations: int = 3000
    batch_size: int = 32
    lr: float = 1e-2
    lr_end: float = 0.0  # where the cosine schedule ends
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "cosine"
    feature_weight: float = 5.0
    augment: bool = True
    seed: int = 0
    blowup_factor: float = 4.0  # batch-to-batch loss noise seen on IMDN x4 DQC: about 1.7x
    max_rollbacks: int = 5
    guard_seed_batches: int = 4

    def __post_init__(self) -> None:
        if self.iterations < 0 or min(self.batch_size, self.calib_count, self.calib_size, self.calib_batch) < 1:
            raise SrquantError("2DQuant needs iterations >= 0 and positive batch sizes, counts and crops")
        if self.crop < 1:
            raise SrquantError(f"2DQuant DQC crop must be positive, got {self.crop}")
        if self.schedule not in ("cosine", "constant"):
            raise SrquantError(f"DQC schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if not self.lr > 0:
            raise SrquantError(f"DQC learning rate must be positive, got {self.lr}")
        if not self.blowup_factor > 1 or self.max_rollbacks < 1:
            raise SrquantError("DQC needs blowup_factor > 1 and max_rollbacks >= 1")


TWODQUANT_PRESETS = {
    # Paper, section 4.1: 32 LR crops of 64x64 for DOBI; DQC 3000 iterations, batch 32, Adam 1e-2,
    # betas (0.9, 0.999), cosine annealing; lambda is not given in the paper, the code's 5 is used.
    "paper": TwoDQuantConfig(),
    # Released code (options/train/train_2DQuant_x4.yml): 4000 iterations, batch 16, betas (0.9, 0.99),
    # constant learning rate.
    "code": TwoDQuantConfig(iterations=4000, batch_size=16, betas=(0.9, 0.99), schedule="constant"),
    # CPU: the same algorithm and data; fewer and smaller DQC steps (sized in docs/quantization.md).
    "cpu": TwoDQuantConfig(crop=40, iterations=100, batch_size=4),
    # GPU: srquant's own recipe at the paper's schedule (per-channel weights by default).
    "gpu": TwoDQuantConfig(),
}


@dataclass
class DQCReport:
    """What happened during DQC: losses, rollbacks after divergence, wall time."""

    losses: list[float] = field(default_factory=list)
    rollbacks: list[str] = field(default_factory=list)
    stopped_early: bool = False
    seconds: float = 0.0


def run_dqc(
    model: nn.Module,
    draw_batch: Callable[[int], torch.Tensor],
    config: TwoDQuantConfig,
    progress: bool = False,
    params: list[nn.Parameter] | None = None,
    teacher: nn.Module | None = None,
) -> DQCReport:
    """Train the bounds of a calibrated quantized model by distillation from its own FP mode (or from `teacher`,
    a `float_teacher` copy, when the model's weights no longer hold the float values).

    `draw_batch(n)` returns n LR crops; `params` are the bounds to train (default: every quantizer's). The
    divergence guard restores the last sound bounds and halves the learning rate on a NaN/inf loss or a loss above
    `blowup_factor` times the recent median.
    """
    report = DQCReport()
    params = params if params is not None else bound_parameters(model)
    if not params:
        raise SrquantError("DQC needs a quantized model with learnable bounds")
    stages = tuple(getattr(model, "stage_names", ()))
    optimizer = torch.optim.Adam(params, lr=config.lr, betas=config.betas, weight_decay=0.0)
    total = max(config.iterations, 1)
    if config.schedule == "cosine":
        scheduler: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=total, eta_min=config.lr_end
        )
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0)
    generator = torch.Generator().manual_seed(config.seed)
    start = time.perf_counter()
    model.eval()  # teacher and student both in eval mode: no normalisation statistics change
    reference = capture_stages(teacher, stages) if teacher is not None else nullcontext(None)
    with frozen_weights(model, params), capture_stages(model, stages) as feats, reference as teacher_feats:

        def loss_of(batch: torch.Tensor) -> torch.Tensor:
            return distillation_loss(
                model, batch, stages, feats, config.feature_weight, teacher=teacher, teacher_feats=teacher_feats
            )

        with torch.no_grad():
            seeds = [float(loss_of(draw_batch(config.batch_size))) for _ in range(config.guard_seed_batches)]
        guard = DivergenceGuard(params, config.blowup_factor, config.max_rollbacks, seeds)
        bar = tqdm(range(config.iterations), desc="DQC", disable=not progress, leave=False)
        for step in bar:
            batch = draw_batch(config.batch_size)
            if config.augment:
                batch = dihedral(batch, random_dihedral(generator))
            loss = loss_of(batch)
            value = float(loss.detach())
            if not guard.step(loss, value, f"step {step}", optimizer):
                if guard.stopped:
                    break
                continue
            scheduler.step()
            report.losses.append(value)
            bar.set_postfix(loss=f"{value:.4f}")
        if config.iterations:
            with torch.no_grad():
                guard.final_check(float(loss_of(draw_batch(config.batch_size))))
    report.rollbacks, report.stopped_early = guard.rollbacks, guard.stopped
    report.seconds = time.perf_counter() - start
    return report


class TwoDQuant(Method):
    """DOBI ranges on the FP network's tensors, then DQC trains the bounds by distillation."""

    name = "2dquant"
    summary = "2DQuant: DOBI range search, then the bounds trained by distillation from the FP network (DQC)"
    config_type = TwoDQuantConfig
    presets = TWODQUANT_PRESETS

    def run(
        self,
        model: nn.Module,
        layout: QuantLayout,
        spec: QuantSpec,
        data: CalibrationData,
        config: TwoDQuantConfig,
        progress: bool = False,
    ) -> MethodRun:
        start = time.perf_counter()
        report = quantize_(model, spec, layout)
        size, crop = data.rounded(config.calib_size), data.rounded(config.crop)
        calibrate(
            model, data.batches(config.calib_count, size, config.calib_batch, config.seed), "dobi", 99.99, progress
        )
        dqc = DQCReport()
        if config.iterations > 0:
            dqc = run_dqc(model, data.stream(crop, config.seed + 1), config, progress)
        settings = {**self.settings(config), "calib_size": size, "crop": crop}
        seconds = time.perf_counter() - start
        return MethodRun(model, report, spec, seconds, settings, None, dqc.rollbacks, dqc.losses)
