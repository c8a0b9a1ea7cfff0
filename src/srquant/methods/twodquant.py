"""2DQuant (Liu et al., NeurIPS 2024): DOBI bound search, then Distillation Quantization Calibration (DQC).

DQC trains only the quantizer bounds with Adam, the network weights frozen. The teacher is the same network
with quantization switched off (eval mode), so no HR image is needed: the loss is
    L = L1(student output, teacher output) + lambda * sum over stages of F(student stage, teacher stage),
where F is the mean squared distance of the per-sample L2-normalised stage features (each sample
normalised on its own; the released code's normalisation broadcast across the batch, which is not copied).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from srquant.errors import SrquantError
from srquant.quant.quantize import bound_parameters, fp_mode


@dataclass(frozen=True)
class DQCConfig:
    """The DQC schedule; `presets` holds the paper's, the released code's and a CPU-sized one."""

    iterations: int = 3000
    batch_size: int = 32
    lr: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "cosine"
    feature_weight: float = 5.0
    augment: bool = True
    seed: int = 0
    blowup_factor: float = 4.0  # batch-to-batch loss noise seen on IMDN x4 DQC: about 1.7x
    max_rollbacks: int = 5

    def __post_init__(self) -> None:
        if self.iterations < 0 or self.batch_size < 1:
            raise SrquantError("DQC needs iterations >= 0 and batch_size >= 1")
        if self.schedule not in ("cosine", "constant"):
            raise SrquantError(f"DQC schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if not self.lr > 0:
            raise SrquantError(f"DQC learning rate must be positive, got {self.lr}")


@dataclass
class DQCReport:
    """What happened during DQC: losses, rollbacks after divergence, wall time."""

    losses: list[float] = field(default_factory=list)
    rollbacks: list[str] = field(default_factory=list)
    stopped_early: bool = False
    seconds: float = 0.0


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """One of the 8 rotations/flips of a batch (k in 0..7): the paper's rot90/180/270 + flip augmentation."""
    x = torch.rot90(x, k % 4, dims=(-2, -1))
    return x.flip(-1) if k >= 4 else x


def normalised_feature_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared distance between per-sample L2-normalised features (any layout: B x ...)."""
    s = student.flatten(1)
    t = teacher.flatten(1)
    s = s / s.norm(dim=1, keepdim=True).clamp_min(1e-12)
    t = t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return F.mse_loss(s, t)


@contextmanager
def capture_stages(model: nn.Module, names: tuple[str, ...]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the outputs of the named stage modules during forward passes."""
    store: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        module = model.get_submodule(name)

        def hook(_m: nn.Module, _i: tuple, out: torch.Tensor, key: str = name) -> None:
            store[key] = out[0] if isinstance(out, tuple) else out

        handles.append(module.register_forward_hook(hook))
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def frozen_weights(model: nn.Module, trainable: list[nn.Parameter]) -> Iterator[None]:
    """Only `trainable` parameters require grad inside the block (saves weight-gradient work)."""
    keep = {id(p) for p in trainable}
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(id(p) in keep)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def run_dqc(
    model: nn.Module,
    draw_batch: Callable[[int], torch.Tensor],
    config: DQCConfig,
    progress: bool = False,
) -> DQCReport:
    """Train the bounds of a calibrated quantized model by distillation from its own FP mode.

    `draw_batch(n)` returns n LR crops. A NaN/inf loss or a loss above `blowup_factor` times the
    running median restores the last good bounds, halves the learning rate and is reported; after
    `max_rollbacks` the run stops with the last good state.
    """
    report = DQCReport()
    params = bound_parameters(model)
    if not params:
        raise SrquantError("DQC needs a quantized model with learnable bounds")
    stages = tuple(getattr(model, "stage_names", ()))
    optimizer = torch.optim.Adam(params, lr=config.lr, betas=config.betas, weight_decay=0.0)
    total = max(config.iterations, 1)
    if config.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0)
    generator = torch.Generator().manual_seed(config.seed)
    good_state = [p.detach().clone() for p in params]
    recent: list[float] = []
    start = time.perf_counter()
    model.eval()  # teacher and student both in eval mode: no normalisation statistics change
    bar = tqdm(range(config.iterations), desc="DQC", disable=not progress, leave=False)
    with frozen_weights(model, params), capture_stages(model, stages) as feats:
        for step in bar:
            batch = draw_batch(config.batch_size)
            if config.augment:
                batch = dihedral(batch, int(torch.randint(8, (1,), generator=generator)))
            with torch.no_grad(), fp_mode(model):
                target = model(batch)
                teacher_feats = {k: v.detach() for k, v in feats.items()}
            output = model(batch)
            loss = F.l1_loss(output, target)
            if stages and config.feature_weight:
                feat_loss = sum(normalised_feature_distance(feats[k], teacher_feats[k]) for k in stages)
                loss = loss + config.feature_weight * feat_loss
            value = float(loss.detach())
            median = sorted(recent)[len(recent) // 2] if recent else math.inf
            if not math.isfinite(value) or (len(recent) >= 5 and value > config.blowup_factor * median):
                with torch.no_grad():
                    for p, saved in zip(params, good_state, strict=True):
                        p.copy_(saved)
                for group in optimizer.param_groups:
                    group["lr"] *= 0.5
                optimizer.state.clear()
                note = f"step {step}: loss {value:.4g} (median {median:.4g}); bounds restored, lr halved"
                report.rollbacks.append(note)
                if len(report.rollbacks) >= config.max_rollbacks:
                    report.stopped_early = True
                    break
                continue
            good_state = [p.detach().clone() for p in params]  # these bounds just gave a sound loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            recent = (recent + [value])[-50:]
            report.losses.append(value)
            bar.set_postfix(loss=f"{value:.4f}")
    report.seconds = time.perf_counter() - start
    return report
