"""AdaBM's short fine-tuning: distillation from the same network in `fp_mode` (no HR images), phases cycling
weight bounds -> activation bounds -> bit measures, one Adam per group, each learning rate x0.9 (StepLR, step 1)
at the end of each of its own phases. Loss = L1 + w_feat * mean over stages of the normalised feature distance
(+ w_bit * max(avg_bit - base, 0) in the bit phases).

With both adaptations off (the fixed-bit control) the bit phases keep their place in the schedule (same batches
drawn, same learning-rate decay) but take no step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from srquant.methods.adabm.config import AdaBMConfig
from srquant.methods.adabm.controller import AdaptiveBitsModel
from srquant.methods.training import (
    DivergenceGuard,
    capture_stages,
    dihedral,
    distillation_loss,
    frozen_weights,
    random_dihedral,
)
from srquant.quant.calibrators import is_weight_quantizer
from srquant.quant.quantize import quantizers

PHASES = ("weight", "activation", "bit")


@dataclass
class FineTuneLog:
    """Losses and phases of the steps taken, and the divergence guard's notes."""

    losses: list[float] = field(default_factory=list)
    phases: list[str] = field(default_factory=list)
    rollbacks: list[str] = field(default_factory=list)
    stopped_early: bool = False


def phase_parameters(model: AdaptiveBitsModel) -> dict[str, list[nn.Parameter]]:
    """Trainable parameters per phase: weight bounds, activation bounds, the switched-on bit thresholds/measures."""
    weights: list[nn.Parameter] = []
    acts: list[nn.Parameter] = []
    for name, q in quantizers(model.network):
        (weights if is_weight_quantizer(name) else acts).extend(q.parameters())
    return {"weight": weights, "activation": acts, "bit": model.controller.trainable()}


def _decay(optimizer: torch.optim.Optimizer | None, gamma: float) -> None:
    """StepLR(step_size=1, gamma) of the phase that just ended: the original steps only that phase's scheduler,
    so each learning rate decays once per epoch of its own phase."""
    if optimizer is not None:
        for group in optimizer.param_groups:
            group["lr"] *= gamma


def fine_tune(
    model: AdaptiveBitsModel,
    calib: Sequence[torch.Tensor],
    draw_batch: Callable[[int], torch.Tensor],
    config: AdaBMConfig,
    progress: bool = False,
) -> FineTuneLog:
    """Phase-cycled distillation with a divergence guard that restores every trainable method parameter."""
    log = FineTuneLog()
    if config.epochs == 0 or config.iterations == 0:
        return log
    controller, network = model.controller, model.network
    groups = phase_parameters(model)
    controller_ids = {id(p) for p in controller.parameters()}
    trainable = [p for phase in PHASES for p in groups[phase]]
    bit_groups: list[dict[str, object]] = []  # only the switched-on adaptations are given to an optimizer
    if controller.image_active:
        bit_groups.append({"params": [controller.measure_l, controller.measure_u], "lr": config.lr_measure_img})
    if controller.layer2bit:
        bit_groups.append({"params": [controller.measure_layer], "lr": config.lr_measure_layer})
    optimizers: dict[str, torch.optim.Optimizer] = {
        "weight": torch.optim.Adam(groups["weight"], lr=config.lr_w, betas=config.betas),
        "activation": torch.optim.Adam(groups["activation"], lr=config.lr_a, betas=config.betas),
    }
    if bit_groups:
        optimizers["bit"] = torch.optim.Adam(bit_groups, betas=config.betas)
    stages = tuple(getattr(network, "stage_names", ()))
    generator = torch.Generator().manual_seed(config.seed)

    def loss_of(batch: torch.Tensor, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return distillation_loss(model, batch, stages, feats, config.feature_weight, average_stages=True)

    with capture_stages(network, stages) as feats, torch.no_grad():
        chunks = [c for b in calib for c in b.split(config.batch_size)][: config.guard_seed_batches]
        seeds = [float(loss_of(c, feats)) for c in chunks]
    guard = DivergenceGuard(trainable, config.blowup_factor, config.max_rollbacks, seeds)
    bar = tqdm(total=config.epochs * config.iterations, desc="AdaBM", disable=not progress, leave=False)
    for epoch in range(config.epochs):
        phase = PHASES[epoch % len(PHASES)]
        active = groups[phase]
        if not active:  # a bit phase with both adaptations off: same batches drawn, no step taken
            for _ in range(config.iterations):
                draw_batch(config.batch_size)
                if config.augment:
                    random_dihedral(generator)
            bar.update(config.iterations)
            continue
        optimizer = optimizers[phase]
        network_active = [p for p in active if id(p) not in controller_ids]
        with (
            frozen_weights(network, network_active),
            frozen_weights(controller, active),
            capture_stages(network, stages) as feats,
        ):
            for step in range(config.iterations):
                bar.update(1)
                batch = draw_batch(config.batch_size)
                if config.augment:
                    batch = dihedral(batch, random_dihedral(generator))
                distill = loss_of(batch, feats)
                loss = distill
                if phase == "bit" and config.bit_weight and model.last_bits is not None:
                    loss = loss + config.bit_weight * (model.last_bits.mean() - controller.base_bits).clamp_min(0)
                value, distill_value = float(loss.detach()), float(distill.detach())
                label = f"epoch {epoch} ({phase} phase) step {step}"
                if not guard.step(loss, value, label, optimizer, monitored=distill_value):
                    if guard.stopped:
                        break
                    continue
                log.losses.append(value)
                log.phases.append(phase)
                bar.set_postfix(phase=phase, loss=f"{value:.4f}")
        _decay(optimizers.get(phase), config.lr_gamma)
        if guard.stopped:
            break
    bar.close()
    with capture_stages(network, stages) as feats, torch.no_grad():
        guard.final_check(float(loss_of(draw_batch(config.batch_size), feats)))
    log.rollbacks, log.stopped_early = guard.rollbacks, guard.stopped
    return log
