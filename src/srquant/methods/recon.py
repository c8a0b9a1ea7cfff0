"""Block reconstruction (BRECQ / QDrop style): learned weight rounding and activation ranges, block by block.

1. `quantize_`, then DOBI ranges for every quantizer (weights scored exactly per output channel); optionally
   (`dqc_iterations` > 0) 2DQuant's DQC then distils every bound, weights' and activations', end to end, so the
   blocks start from 2DQuant's ranges and weight grids.
2. The network is cut into blocks in execution order: its stages (`stage_names`, e.g. IMDN's IMDBs, a
   transformer's groups), and every quantized layer outside them as a block of its own.
3. For each block in turn, the calibration crops are run through the network twice, stopping at the block: once
   through a float copy taken before step 3 (the blocks already reconstructed hold grid values in their weights,
   so the network's own FP mode is no longer the float network), for the block's float input and its output (the
   target), and once quantized (the blocks before it already reconstructed), for the input the quantized block
   will really get. The block then learns, with Adam:
   - each weight's rounding (AdaRound: up or down per element on the weight's fixed grid, with the rounding
     regularizer annealed from beta 20 to 2 after a 20% warm-up, at a constant learning rate so that every soft
     decision has reached 0 or 1 when it is made hard), and
   - its activation ranges (the bounds of every activation quantizer in it: layer inputs, attention-matmul
     operands, simulated outputs; learning rate on a cosine to zero),
   minimising the mean squared error to the float block's output, with QDrop: while training, each element of a
   quantized activation keeps its float value with probability `drop_prob`, and the block's input is the quantized
   input with the same share of elements taken from the float one.
4. The rounding is fixed (hard) and written into the weights, which then hold grid values: checkpoints store
   them as integer codes and exports use them, bit-identically.
5. Then (`e2e_iterations` > 0; the `cpu` preset runs 300 steps) the activation ranges are distilled end to end
   from that float copy (DQC's loss, the divergence guard), the weights staying as reconstructed. The block losses
   do not see how a range error propagates to the output (docs/quantization.md, CARN-M's `c3` input); this step
   does. It is undone when the network's output error on `e2e_check_count` held-out crops (drawn with another seed)
   does not fall.
6. Optionally (`bias_correction`) each layer's bias is shifted by its mean output error (bias_correction.py).

The divergence guard watches every block: a NaN/inf or blown-up loss restores the block's last sound state.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from srquant.errors import SrquantError
from srquant.methods.base import CalibrationData, Method, MethodRun
from srquant.methods.bias_correction import correct_biases
from srquant.methods.ptq import calibrate
from srquant.methods.training import DivergenceGuard, execution_order, float_teacher, frozen_weights
from srquant.methods.twodquant import TwoDQuantConfig, run_dqc
from srquant.models.layout import QuantLayout
from srquant.quant.calibrators import is_weight_quantizer
from srquant.quant.modules import is_quantized
from srquant.quant.quantize import fp_mode, quantize_, quantizers
from srquant.quant.quantizers import Quantizer, QuantMode
from srquant.quant.rounding import (
    DropMask,
    LearnedRounding,
    annealed_beta,
    attach_rounding,
    fold_rounding,
    set_drop,
)
from srquant.quant.spec import QuantSpec


@dataclass(frozen=True)
class ReconConfig:
    """Calibration crops, the per-block schedule and the optional end-to-end distillation."""

    calib_count: int = 64
    calib_size: int = 48
    calib_batch: int = 8
    iterations: int = 300  # per block
    batch_size: int = 8
    lr_rounding: float = 1e-2
    rounding_schedule: str = "constant"  # the offsets' rate: constant (AdaRound) or cosine to zero like the bounds'
    lr_bounds: float = 1e-3
    round_weight: float = 0.01  # lambda of the rounding regularizer (per weight element, summed)
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    drop_prob: float = 0.5
    learn_rounding: bool = True
    learn_weight_ranges: bool = False  # train the weights' ranges per block (with rounding off: their own STE)
    lr_weight_ranges: float = 1e-3
    dqc_iterations: int = 0  # before the blocks: DQC on every bound (0: start from DOBI's ranges)
    dqc_batch: int = 4
    dqc_crop: int = 40
    dqc_lr: float = 1e-2
    e2e_iterations: int = 0
    e2e_batch: int = 4
    e2e_crop: int = 48
    e2e_lr: float = 1e-3
    e2e_check_count: int = 32  # held-out crops the end-to-end step must lower the output error on (0: no check)
    check_count: int = 0  # > 0: crops drawn with another seed, on which no block may raise the output error
    seed: int = 0
    blowup_factor: float = 4.0
    max_rollbacks: int = 5
    bias_correction: bool = False  # afterwards, shift each layer's bias by its mean output error

    def __post_init__(self) -> None:
        sizes = (self.calib_count, self.calib_size, self.calib_batch, self.batch_size, self.e2e_batch, self.dqc_batch)
        if min(*sizes, self.e2e_crop, self.dqc_crop) < 1:
            raise SrquantError("recon needs positive calibration counts, crop sizes and batch sizes")
        if min(self.iterations, self.e2e_iterations, self.dqc_iterations, self.check_count, self.e2e_check_count) < 0:
            raise SrquantError("recon iterations, check_count and e2e_check_count must be >= 0")
        if not (self.lr_rounding > 0 and self.lr_bounds > 0 and self.e2e_lr > 0 and self.dqc_lr > 0):
            raise SrquantError("recon learning rates must be positive")
        if self.learn_rounding and self.learn_weight_ranges:
            raise SrquantError("recon learns either the weights' rounding (on a fixed grid) or their ranges, not both")
        if not 0 <= self.drop_prob < 1 or self.round_weight < 0 or not 0 <= self.warmup < 1:
            raise SrquantError("recon needs drop_prob in [0, 1), round_weight >= 0 and warmup in [0, 1)")
        if not self.blowup_factor > 1 or self.max_rollbacks < 1:
            raise SrquantError("recon needs blowup_factor > 1 and max_rollbacks >= 1")
        if self.rounding_schedule not in ("constant", "cosine"):
            raise SrquantError(f"recon rounding_schedule is 'constant' or 'cosine', not {self.rounding_schedule!r}")


RECON_PRESETS = {
    # srquant's CPU schedule: 64 LR crops of 32 px, 600 steps of batch 4 per block, then 300 end-to-end steps on
    # the activation ranges (CARN-M x4: 13 minutes on 2 cores); the best of the variants measured in
    # docs/quantization.md (300 block steps gave 0.25 dB less on IMDN, 1000 no more; the end-to-end steps lowered
    # CARN-M's held-out output error by 22% and are undone where they raise it, as on IMDN).
    "cpu": ReconConfig(calib_size=32, batch_size=4, lr_rounding=0.05, iterations=600, e2e_iterations=300),
    # For a GPU: BRECQ's and QDrop's 20,000 steps per block at batch 32 on 1,024 crops, and 2,000 end-to-end steps.
    "gpu": ReconConfig(
        calib_count=1024,
        calib_size=64,
        calib_batch=32,
        iterations=20000,
        batch_size=32,
        e2e_iterations=2000,
        e2e_batch=16,
        e2e_crop=64,
    ),
}


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the block's input and output are captured."""


@dataclass
class BlockData:
    """A block's inputs and outputs over the calibration crops, and the other arguments it is called with."""

    inputs: torch.Tensor
    outputs: torch.Tensor
    extra: tuple
    kwargs: dict


@contextmanager
def _capture(block: nn.Module, store: dict, stop: bool) -> Iterator[None]:
    """Record the block's first input, its other arguments and its output; optionally stop the pass there."""

    def hook(_m: nn.Module, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        store.setdefault("input", []).append(args[0].detach())
        store.setdefault("output", []).append((out[0] if isinstance(out, tuple) else out).detach())
        store.setdefault("extra", (args[1:], kwargs))
        if stop:
            raise _Stop

    handle = block.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def block_data(model: nn.Module, block: nn.Module, batches: Sequence[torch.Tensor], quantized: bool) -> BlockData:
    """A block's inputs and outputs over the calibration batches, in float (`quantized` False) or quantized."""
    store: dict = {}
    with _capture(block, store, stop=True):
        for batch in batches:
            try:
                if quantized:
                    model(batch)
                else:
                    with fp_mode(model):
                        model(batch)
            except _Stop:
                pass
    if "input" not in store:
        raise SrquantError("a block to reconstruct was not reached by the calibration crops")
    extra, kwargs = store["extra"]
    return BlockData(torch.cat(store["input"]), torch.cat(store["output"]), extra, kwargs)


def blocks_of(model: nn.Module, sample: torch.Tensor) -> list[str]:
    """The reconstruction blocks: the stages, then each quantized layer outside them, in execution order."""
    stages = list(getattr(model, "stage_names", ()))
    layers = [n for n, m in model.named_modules() if is_quantized(m) and not any(n.startswith(f"{s}.") for s in stages)]
    inside = {s for s in stages if any(is_quantized(m) for m in model.get_submodule(s).modules())}
    return execution_order(model, [*[s for s in stages if s in inside], *layers], sample)


def _block_parts(block: nn.Module) -> tuple[list[nn.Module], list[Quantizer]]:
    """The quantized layers in a block and its activation quantizers (weights' quantizers excluded)."""
    layers = [m for m in block.modules() if is_quantized(m) and m.weight_quantizer.mode is QuantMode.QUANT]
    acts = [q for name, q in quantizers(block) if not is_weight_quantizer(name) and q.mode is QuantMode.QUANT]
    return layers, acts


def reconstruction_error(out: torch.Tensor | tuple, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over channels, averaged over samples and positions (BRECQ's block loss)."""
    out = out[0] if isinstance(out, tuple) else out
    channels = out.shape[1] if out.dim() == 4 else out.shape[-1]
    return F.mse_loss(out, target) * channels


def reconstruct_block(
    block: nn.Module,
    quantized: BlockData,
    floating: BlockData,
    config: ReconConfig,
    generator: torch.Generator,
    label: str,
    progress: bool = False,
) -> list[str]:
    """Learn one block's rounding and activation ranges (see the module docstring); returns the guard's notes."""
    layers, acts = _block_parts(block)
    try:
        roundings = [attach_rounding(m) for m in layers] if config.learn_rounding else []
        bounds = [p for q in acts for p in q.parameters()]
        ranges = [p for m in layers for p in m.weight_quantizer.parameters(recurse=False)]
        offsets = {"params": [r.offset for r in roundings], "lr": config.lr_rounding, "rounding": True}
        groups = [offsets] if roundings else []
        groups += [{"params": bounds, "lr": config.lr_bounds}] if bounds else []
        if config.learn_weight_ranges and not roundings and ranges:
            groups += [{"params": ranges, "lr": config.lr_weight_ranges}]
        if not groups:
            return []
        trainable = [p for g in groups for p in g["params"]]
        set_drop(acts, config.drop_prob, generator)
        with frozen_weights(block, trainable):
            return _train_block(block, quantized, floating, config, generator, label, progress, roundings, groups)
    finally:
        set_drop(acts, 0.0)
        for m in layers:
            fold_rounding(m)


def _constant_rate(_step: int) -> float:
    """A learning-rate factor that never changes (AdaRound's rounding offsets)."""
    return 1.0


def _cosine(iterations: int) -> Callable[[int], float]:
    """The cosine factor from 1 to 0 over `iterations` steps."""
    total = max(iterations, 1)
    return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))


def _train_block(
    block: nn.Module,
    quantized: BlockData,
    floating: BlockData,
    config: ReconConfig,
    generator: torch.Generator,
    label: str,
    progress: bool,
    roundings: list[LearnedRounding],
    groups: list[dict],
) -> list[str]:
    """The optimisation loop of `reconstruct_block`: Adam (the bounds' rate on a cosine), QDrop'd inputs, the guard."""
    optimizer = torch.optim.Adam(groups)
    constant = config.rounding_schedule == "constant"
    cosine = _cosine(config.iterations)
    rates = [_constant_rate if constant and g.get("rounding") else cosine for g in groups]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, rates)
    inputs_q, inputs_fp, targets = quantized.inputs, floating.inputs, floating.outputs
    count = inputs_q.shape[0]

    def error(batch: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return reconstruction_error(block(batch, *floating.extra, **floating.kwargs), target)

    with torch.no_grad():
        starts = range(0, min(count, 4 * config.batch_size), config.batch_size)
        seeds = [float(error(inputs_q[i : i + config.batch_size], targets[i : i + config.batch_size])) for i in starts]
    guard = DivergenceGuard([p for g in groups for p in g["params"]], config.blowup_factor, config.max_rollbacks, seeds)
    mix = DropMask(config.drop_prob, generator) if config.drop_prob > 0 else None
    for step in tqdm(range(config.iterations), desc=label, disable=not progress, leave=False):
        pick = torch.randint(count, (config.batch_size,), generator=generator, device=generator.device)
        batch = inputs_q[pick]
        if mix is not None:
            batch = torch.where(mix(batch), inputs_fp[pick], batch)
        recon = error(batch, targets[pick])
        loss = recon
        if roundings and step >= int(config.warmup * config.iterations):  # no rounding term in the warm-up
            beta = annealed_beta(step, config.iterations, config.beta_start, config.beta_end, config.warmup)
            loss = loss + config.round_weight * sum(r.regularizer(beta) for r in roundings)
        if not guard.step(loss, float(recon.detach()), f"{label} step {step}", optimizer):  # judged on the fit alone
            if guard.stopped:
                break
            continue
        scheduler.step()
    return guard.rollbacks


def _dqc_config(config: ReconConfig, iterations: int, batch_size: int, lr: float) -> TwoDQuantConfig:
    """A DQC schedule (before or after the blocks) with recon's seed and divergence-guard settings."""
    return TwoDQuantConfig(
        iterations=iterations,
        batch_size=batch_size,
        lr=lr,
        seed=config.seed,
        blowup_factor=config.blowup_factor,
        max_rollbacks=config.max_rollbacks,
    )


@torch.no_grad()
def output_error(model: nn.Module, crops: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> float:
    """The network's output mean squared error against the float teacher's outputs on some crops."""
    return sum(float(F.mse_loss(model(x), t)) for x, t in zip(crops, targets, strict=True)) / len(crops)


def run_recon(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    config: ReconConfig,
    progress: bool = False,
    draw_e2e: Callable[[int], torch.Tensor] | None = None,
    teacher: nn.Module | None = None,
    check: Sequence[torch.Tensor] = (),
    e2e_check: Sequence[torch.Tensor] = (),
) -> list[str]:
    """Reconstruct a DOBI-calibrated quantized network block by block on the calibration batches (in place), against
    `teacher` (a `float_teacher` copy of it, made here when not given). With `check` crops (drawn apart from the
    training crops), a block whose reconstruction raises the network's output error on them goes back to its
    state before; the end-to-end step (`draw_e2e`) is undone unless it lowers the output error on `e2e_check`."""
    model.eval()
    device = batches[0].device
    generator = torch.Generator(device=device).manual_seed(config.seed)
    notes: list[str] = []
    blocks = blocks_of(model, batches[0][:1])
    if teacher is None:  # a float copy, taken before any block writes its rounding into the weights
        teacher = float_teacher(model)
    with torch.no_grad():
        check_targets = [teacher(x) for x in check]
    current = output_error(model, check, check_targets) if check else 0.0
    for index, name in enumerate(blocks):
        block = model.get_submodule(name)
        floating = block_data(teacher, teacher.get_submodule(name), batches, quantized=False)
        quantized = block_data(model, block, batches, quantized=True)
        label = f"block {index + 1}/{len(blocks)} {name}"
        saved = copy.deepcopy(block.state_dict()) if check else None
        notes += reconstruct_block(block, quantized, floating, config, generator, label, progress)
        if saved is None:
            continue
        if (after := output_error(model, check, check_targets)) > current:
            block.load_state_dict(saved)
            notes.append(f"{label}: kept as it was (output error on the check crops {after:.4g} > {current:.4g})")
        else:
            current = after
    if config.e2e_iterations and draw_e2e is not None:
        notes += distil_ranges(model, draw_e2e, config, teacher, e2e_check, progress)
    return notes


def distil_ranges(
    model: nn.Module,
    draw: Callable[[int], torch.Tensor],
    config: ReconConfig,
    teacher: nn.Module,
    held_out: Sequence[torch.Tensor] = (),
    progress: bool = False,
) -> list[str]:
    """Step 5: every activation range distilled end to end against the float `teacher`; put back as it was when
    the output error on the `held_out` crops does not fall. Returns the guard's notes."""
    acts = [p for n, q in quantizers(model) if not is_weight_quantizer(n) for p in q.parameters()]
    with torch.no_grad():
        targets = [teacher(x) for x in held_out]
        saved = [p.detach().clone() for p in acts]
    before = output_error(model, held_out, targets) if held_out else 0.0
    dqc = _dqc_config(config, config.e2e_iterations, config.e2e_batch, config.e2e_lr)
    notes = run_dqc(model, draw, dqc, progress, params=acts, teacher=teacher).rollbacks
    if held_out and (after := output_error(model, held_out, targets)) >= before:
        with torch.no_grad():
            for p, value in zip(acts, saved, strict=True):
                p.copy_(value)
        notes.append(f"end-to-end ranges undone (held-out output error {after:.4g} >= {before:.4g})")
    return notes


class Recon(Method):
    """Block reconstruction: learned weight rounding and activation ranges per block, with QDrop."""

    name = "recon"
    summary = "block reconstruction: learned rounding (AdaRound) and activation ranges per block, with QDrop"
    config_type = ReconConfig
    presets = RECON_PRESETS

    def run(
        self,
        model: nn.Module,
        layout: QuantLayout,
        spec: QuantSpec,
        data: CalibrationData,
        config: ReconConfig,
        progress: bool = False,
    ) -> MethodRun:
        start = time.perf_counter()
        report = quantize_(model, spec, layout)
        size = data.rounded(config.calib_size)
        batches = data.batches(config.calib_count, size, config.calib_batch, config.seed)
        calibrate(model, batches, "dobi", progress=progress)
        teacher = float_teacher(model)  # the float network, for DQC, the blocks and bias correction
        notes: list[str] = []
        if config.dqc_iterations:
            dqc = _dqc_config(config, config.dqc_iterations, config.dqc_batch, config.dqc_lr)
            draw_dqc = data.stream(data.rounded(config.dqc_crop), config.seed + 2)
            notes += run_dqc(model, draw_dqc, dqc, progress, teacher=teacher).rollbacks
        draw = data.stream(data.rounded(config.e2e_crop), config.seed + 1) if config.e2e_iterations else None
        check = (
            data.batches(config.check_count, size, config.calib_batch, config.seed + 3) if config.check_count else []
        )
        held_out = (
            data.batches(config.e2e_check_count, data.rounded(config.e2e_crop), config.calib_batch, config.seed + 4)
            if config.e2e_iterations and config.e2e_check_count
            else []
        )
        notes += run_recon(model, batches, config, progress, draw, teacher, check, held_out)
        settings = {**dataclasses.asdict(config), "calib_size": size}
        if config.bias_correction:
            settings["bias_corrected"] = len(correct_biases(model, batches, progress, reference=teacher))
        return MethodRun(model, report, spec, time.perf_counter() - start, settings, None, notes)
