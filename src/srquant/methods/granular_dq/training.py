"""Granular-DQ's quantization, calibration and training (QAT to HR, or distillation), with the divergence guard."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from srquant.errors import SrquantError
from srquant.methods.granular_dq.config import GranularDQConfig
from srquant.methods.granular_dq.controller import (
    Attachment,
    GranularityBitController,
    attach_controller,
    head_conv_name,
    multibit_quantizers,
)
from srquant.methods.granular_dq.entropy import patch_entropy
from srquant.methods.training import DivergenceGuard, dihedral, frozen_weights, random_dihedral
from srquant.models.layout import QuantLayout
from srquant.quant.calibrators import RangeCalibrator, run_calibration
from srquant.quant.quantize import QuantReport, fp_mode, quantize_, quantizers
from srquant.quant.quantizers import MultiBitLSQ, Quantizer, QuantMode
from srquant.quant.spec import QuantSpec, matches

Batch = torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]


class _MagnitudeCalibrator(RangeCalibrator):
    """Min/max plus the mean |x| of the inputs a layer sees (LSQ's initial step)."""

    def __init__(self, name: str, quantizer: Quantizer) -> None:
        super().__init__(name, quantizer)
        self.abs_sum = 0.0
        self.count = 0

    def collect(self, x: torch.Tensor) -> None:
        super().collect(x)
        self.abs_sum += float(x.abs().sum())
        self.count += x.numel()


def quantize_granular(
    model: nn.Module, layout: QuantLayout, config: GranularDQConfig, granularity: str = "tensor"
) -> tuple[QuantReport, QuantSpec, list[str]]:
    """`quantize_` the body at W{w_bits} LSQ, then give each body conv a `MultiBitLSQ` input quantizer."""
    spec = QuantSpec(
        config.w_bits,
        max(config.candidate_bits),
        weight_quantizer="lsq",
        act_quantizer="lsq",
        weight_granularity=granularity,
        matmul=False,
        full=False,
    )
    report = quantize_(model, spec, layout)
    names = [name for name in report.layers if matches(name, layout.body)]
    if not names:
        raise SrquantError("Granular-DQ found no body layers: the layout's body matched nothing")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    for name in names:
        model.get_submodule(name).input_quantizer = MultiBitLSQ(config.candidate_bits).to(device)
    return report, spec, names


@torch.no_grad()
def calibrate_granular(
    model: nn.Module,
    controller: GranularityBitController,
    batches: Sequence[torch.Tensor],
    config: GranularDQConfig,
) -> None:
    """Weight steps from max|W| (per row); activation signedness and LSQ steps from the calibration inputs; E2B
    thresholds. Only the body runs quantized: layers that `quantize_` converted outside it stay FP."""
    named = [(name, model.get_submodule(name)) for name in controller.layer_names]
    for _, module in named:
        wq = module.weight_quantizer
        top = module.weight.detach().reshape(wq.rows, -1).abs().amax(dim=1).clamp_min(1e-8)
        if config.weight_init == "max":
            wq.set_range(-top, top)  # step max|W| / Qp: every level in use
        else:
            wq.init_lsq(top)  # the released code's 2 max|W| / sqrt(Qp)
    stats = {f"{name}.input_quantizer": _MagnitudeCalibrator(name, m.input_quantizer) for name, m in named}
    run_calibration(model, batches, stats, label="Granular-DQ calibration")
    for name, module in named:
        s = stats[f"{name}.input_quantizer"]
        if s.count == 0 or s.lo is None:
            raise SrquantError(f"Granular-DQ body layer {name} saw no calibration data")
        module.input_quantizer.set_signed(float(s.lo.min()) < -1e-5)
        module.input_quantizer.init_lsq(s.abs_sum / s.count)
    controller.calibrate_thresholds(torch.cat([patch_entropy(b, controller.bins, controller.sigma) for b in batches]))
    body = {f"{name}.{part}" for name in controller.layer_names for part in ("input_quantizer", "weight_quantizer")}
    for name, q in quantizers(model):
        q.mode = QuantMode.QUANT if name in body else QuantMode.FP


@dataclass
class GranularDQResult:
    """A model quantized and trained by Granular-DQ, its controller and what happened."""

    controller: GranularityBitController
    attachment: Attachment
    report: QuantReport
    spec: QuantSpec
    layers: tuple[str, ...]
    head: str
    config: GranularDQConfig
    losses: list[float] = field(default_factory=list)
    mean_bits: list[float] = field(default_factory=list)
    thresholds: list[tuple[float, float]] = field(default_factory=list)
    rollbacks: list[str] = field(default_factory=list)
    stopped_early: bool = False
    calib_seconds: float = 0.0
    seconds: float = 0.0
    bit_price: float = 0.0
    distortion_fit: float | None = None  # measured allocation: held-out MSE of the predicted log errors


class _HeadCaptured(Exception):
    """Ends a forward pass once the head conv's output is captured."""


@torch.no_grad()
def head_features(model: nn.Module, head: str, lr: torch.Tensor) -> torch.Tensor:
    """The head conv's output for LR patches (what the controller reads), without running the rest."""
    captured: list[torch.Tensor] = []

    def hook(_m: nn.Module, _args: tuple, out: torch.Tensor) -> None:
        captured.append(out)
        raise _HeadCaptured

    handle = model.get_submodule(head).register_forward_hook(hook)
    try:
        model(lr)
    except _HeadCaptured:
        pass
    finally:
        handle.remove()
    return captured[0]


def budget_shares(bits: Sequence[int], mean: float) -> dict[int, float]:
    """The most spread-out (maximum-entropy) shares over `bits` whose mean bit is `mean`: p_b ~ exp(-theta b)."""
    values = torch.tensor(sorted(bits), dtype=torch.float64)
    if not float(values[0]) <= mean <= float(values[-1]):
        raise SrquantError(f"a mean bit of {mean} is outside {sorted(bits)}")

    def shares(theta: float) -> torch.Tensor:
        return torch.softmax(-theta * values, dim=0)

    low, high = -50.0, 50.0  # the mean falls as theta rises
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if float(shares(middle) @ values) > mean else (low, middle)
    return {int(b): float(p) for b, p in zip(values.tolist(), shares((low + high) / 2).tolist(), strict=True)}


@torch.no_grad()
def patch_errors(
    model: nn.Module, controller: GranularityBitController, batches: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Each patch's mean squared output error against the FP network at every candidate bit (N, n_bits)."""
    was_fixed, errors = controller.fixed_bits, []
    controller.eval()
    try:
        for lr in batches:
            with fp_mode(model):
                reference = model(lr)
            row = []
            for bit in controller.gbc_bits:
                controller.fixed_bits = bit
                row.append((model(lr) - reference).pow(2).flatten(1).mean(dim=1))
            errors.append(torch.stack(row, dim=1))
    finally:
        controller.fixed_bits = was_fixed
    return torch.cat(errors)


def fit_measured_allocation(
    model: nn.Module, controller: GranularityBitController, head: str, batches: Sequence[torch.Tensor], target: float
) -> tuple[float, float]:
    """Measure every patch's error at every bit, fit the controller to predict it from the head features and
    price it to the `target` mean bit on the same patches; returns (held-out fit error, bit price)."""
    errors = patch_errors(model, controller, batches)
    if not torch.isfinite(errors).all():
        raise SrquantError("Granular-DQ's measured allocation saw a non-finite output error")
    feat = torch.cat([head_features(model, head, lr) for lr in batches])
    fit = controller.fit_distortion(feat, errors)
    return fit, controller.calibrate_bit_price(feat, torch.cat(list(batches)), target)


def _split(batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(lr, hr) from what draw_batch returned: a tensor (LR only) or an (LR, HR-or-None) pair."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    return batch[0], batch[1]


def _task_loss(model: nn.Module, lr: torch.Tensor, hr: torch.Tensor | None, config: GranularDQConfig) -> torch.Tensor:
    """L1 to HR (QAT) or to the same network in FP (distillation)."""
    if config.loss == "distill":
        with torch.no_grad(), fp_mode(model):
            hr = model(lr)
    elif hr is None:
        raise SrquantError("Granular-DQ QAT needs HR crops: draw_batch must return (lr, hr)")
    return F.l1_loss(model(lr), hr)


def bit_cost(controller: GranularityBitController, config: GranularDQConfig) -> torch.Tensor | float:
    """The bit terms of the loss for the last batch: `bit_penalty` * mean bit / 8, and the budget
    `budget_weight` * max(mean bit - target_fab, 0); 0 for a fixed bit or before any batch."""
    expected = controller.last_expected_bits
    if controller.fixed_bits is not None or controller.measured or expected is None:
        return 0.0
    cost: torch.Tensor | float = 0.0
    if config.bit_penalty:
        cost = cost + config.bit_penalty * expected.mean() / 8
    if config.target_fab is not None:
        cost = cost + config.budget_weight * (expected.mean() - config.target_fab).clamp_min(0)
    return cost


def _trainable(model: nn.Module, controller: GranularityBitController, config: GranularDQConfig) -> list[nn.Parameter]:
    """Quantizer steps and the controller (not for a fixed bit); in QAT mode also every model weight."""
    steps = [p for _, q in quantizers(model) for p in q.parameters()]
    learned = controller.fixed_bits is None and not controller.measured  # measured: fitted after training
    params = steps + (list(controller.parameters()) if learned else [])
    if config.loss == "qat":
        seen = set(map(id, params))
        params += [p for p in model.parameters() if id(p) not in seen]
    return params


def run_granular_dq(
    model: nn.Module,
    layout: QuantLayout,
    draw_batch: Callable[[int], Batch],
    config: GranularDQConfig,
    progress: bool = False,
    draw_entropy_batch: Callable[[int], Batch] | None = None,
    granularity: str = "tensor",
) -> GranularDQResult:
    """Quantize `model` in place, calibrate it and train it with Granular-DQ's patch-wise bits.

    `draw_batch(n)` returns n LR crops in [0, 1] and their HR crops (`(lr, hr)`, as `CropSampler.draw(n, rng,
    with_hr=True)`); in distillation mode an LR tensor alone is enough. The E2B thresholds come from the
    calibration crops, or from `draw_entropy_batch` when given (use test-sized patches, e.g. 96x96, so that the
    entropy distribution matches inference). The model is left in eval mode, quantized, with the controller
    attached and in eval mode (deterministic bits).
    """
    start = time.perf_counter()
    model.eval()
    head = head_conv_name(model, layout)
    report, spec, names = quantize_granular(model, layout, config, granularity)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    controller = GranularityBitController(names, model.get_submodule(head).out_channels, config).to(device)
    sizes = [min(config.calib_batch, config.calib_count - i) for i in range(0, config.calib_count, config.calib_batch)]
    calib = [_split(draw_batch(n))[0] for n in sizes]
    calibrate_granular(model, controller, calib, config)
    test_sized = calib
    if draw_entropy_batch is not None:
        test_sized = [_split(draw_entropy_batch(n))[0] for n in sizes]
        entropies = torch.cat([patch_entropy(b, controller.bins, controller.sigma) for b in test_sized])
        controller.calibrate_thresholds(entropies)
    attachment = attach_controller(model, controller, head)
    result = GranularDQResult(controller, attachment, report, spec, tuple(names), head, config)
    result.thresholds.append(tuple(controller.thresholds.tolist()))  # type: ignore[arg-type]
    result.calib_seconds = time.perf_counter() - start
    if controller.measured and controller.fixed_bits is None:
        _train_measured(model, controller, head, draw_batch, draw_entropy_batch, config, result, progress)
    else:
        _train(model, controller, draw_batch, config, result, progress)
        controller.eval()
        if config.target_fab is not None and controller.fixed_bits is None:
            patches = torch.cat(test_sized)
            result.bit_price = controller.calibrate_bit_price(
                head_features(model, head, patches), patches, config.target_fab
            )
    controller.eval()
    result.seconds = time.perf_counter() - start
    return result


def split_schedule(config: GranularDQConfig, first: int) -> tuple[GranularDQConfig, GranularDQConfig]:
    """The schedule cut after `first` iterations: two configs whose runs together make the whole one (the
    second starts at the learning rate the first ended with; ATC's first epoch belongs to the first)."""
    done = [m for m in config.lr_milestones if m < first]
    head = dataclasses.replace(config, iterations=first, lr_milestones=tuple(done))
    tail = dataclasses.replace(
        config,
        iterations=config.iterations - first,
        lr=config.lr * config.lr_gamma ** len(done),
        lr_milestones=tuple(m - first for m in config.lr_milestones if m >= first),
        epoch_iterations=0,
        seed=config.seed + 1,
    )
    return head, tail


def _train_measured(
    model: nn.Module,
    controller: GranularityBitController,
    head: str,
    draw_batch: Callable[[int], Batch],
    draw_entropy_batch: Callable[[int], Batch] | None,
    config: GranularDQConfig,
    result: GranularDQResult,
    progress: bool,
) -> None:
    """Measured allocation: train on random bits at the budget's shares, fit the controller to each patch's error
    at every bit and price it to the budget, then train the rest of the schedule on the bits it gives (and fit
    again)."""
    assert config.target_fab is not None  # the config requires it for the measured allocation
    warm, rest = split_schedule(config, round(config.iterations * config.allocation_warmup))
    # Every candidate bit trains on random patches, in shares whose mean is the budget, so every bit is ready for
    # any patch and the network sees about the bit mix it will be tested with.
    controller.random_shares = budget_shares(controller.gbc_bits, config.target_fab)
    controller.random_seed = config.seed
    try:
        _train(model, controller, draw_batch, warm, result, progress)
    finally:
        controller.random_shares = None
    draw = draw_entropy_batch or draw_batch
    count = config.distortion_count
    batches = [_split(draw(min(config.calib_batch, count - i)))[0] for i in range(0, count, config.calib_batch)]

    def fit() -> None:
        result.distortion_fit, result.bit_price = fit_measured_allocation(
            model,
            controller,
            head,
            batches,
            config.target_fab,  # type: ignore[arg-type]
        )

    fit()
    if rest.iterations > 0:
        # The rest of the schedule trains on the fitted allocation (deterministic bits, controller frozen), so each
        # bit's steps and the weights adapt to the patches that bit will get; then the fit is redone.
        controller.stochastic = False
        controller.requires_grad_(False)
        try:
            _train(model, controller, draw_batch, rest, result, progress)
        finally:
            controller.stochastic = None
            controller.requires_grad_(True)
        fit()


def _train(
    model: nn.Module,
    controller: GranularityBitController,
    draw_batch: Callable[[int], Batch],
    config: GranularDQConfig,
    result: GranularDQResult,
    progress: bool,
) -> None:
    """Adam on steps, controller (and weights in QAT), ATC in the first epoch, with the divergence guard."""
    if config.iterations == 0:
        return
    trainable = _trainable(model, controller, config)
    mine = {id(p) for p in controller.parameters()}
    groups = [{"params": [p for p in trainable if id(p) not in mine], "lr": config.lr}]
    if any(id(p) in mine for p in trainable):
        controller_lr = config.controller_lr or config.lr
        groups.append({"params": [p for p in trainable if id(p) in mine], "lr": controller_lr})
    optimizer = torch.optim.Adam(groups, betas=config.betas)
    generator = torch.Generator().manual_seed(config.seed)
    controller.reseed(config.seed)
    controller.eval()  # the guard's history: the calibrated model's own spread, at deterministic bits
    with torch.no_grad():
        seeds = [
            float(_task_loss(model, *_split(draw_batch(config.batch_size)), config))
            for _ in range(config.guard_seed_batches)
        ]
    guard = DivergenceGuard([*trainable, controller.thresholds], config.blowup_factor, config.max_rollbacks, seeds)
    controller.train()
    bar = tqdm(total=config.iterations, desc="Granular-DQ", disable=not progress, leave=False)
    try:
        with frozen_weights(model, trainable):
            for step in range(config.iterations):
                bar.update(1)
                if step in config.lr_milestones:
                    for group in optimizer.param_groups:
                        group["lr"] *= config.lr_gamma
                lr, hr = _split(draw_batch(config.batch_size))
                if config.augment:
                    k = random_dihedral(generator)
                    lr, hr = dihedral(lr, k), (dihedral(hr, k) if hr is not None else None)
                if step < config.epoch_iterations and controller.use_atc and controller.fixed_bits is None:
                    controller.atc_update(patch_entropy(lr, controller.bins, controller.sigma))
                task = _task_loss(model, lr, hr, config)
                loss = task + bit_cost(controller, config)
                value, task_value = float(loss.detach()), float(task.detach())
                if not guard.step(loss, value, f"step {step}", optimizer, monitored=task_value):
                    if guard.stopped:
                        break
                    continue
                result.losses.append(value)
                if controller.last_bits is not None:
                    result.mean_bits.append(float(controller.last_bits.float().mean()))
                    if config.target_fab is not None and controller.fixed_bits is None and not controller.measured:
                        # The bit price rises while the batch's bits run above the budget and falls below it, so
                        # the network and its step sizes train on the bit mix they will be tested with.
                        excess = result.mean_bits[-1] - config.target_fab
                        controller.bit_price.add_(config.price_lr * excess).clamp_(min=0.0)
                result.thresholds.append(tuple(controller.thresholds.tolist()))  # type: ignore[arg-type]
                bar.set_postfix(loss=f"{value:.4f}")
        controller.eval()
        with torch.no_grad():
            guard.final_check(float(_task_loss(model, *_split(draw_batch(config.batch_size)), config)))
        result.rollbacks, result.stopped_early = guard.rollbacks, guard.stopped
    finally:
        bar.close()
        controller.eval()
        for q in multibit_quantizers(model, controller):
            q.select(None)
