"""srquant's measured bit allocation for AdaBM: which layers and which images get +1 or -1 bit, chosen from what
each change does to the output error on calibration crops rather than from AdaBM's proxies.

Why (docs/results/adabm_sensitivity_*.md): on IMDN x4 at W4A4 the input std that Layer2Bit ranks is anti-
correlated with what a bit removed costs (Spearman -0.31), and a step down costs about 30x what a step up gains,
so its 30%-up / 30%-down split doubles the output error at the same FAB. Image2Bit raises complex crops and lowers
simple ones, but simple crops lose the most PSNR from a bit removed (Spearman(complexity, cost) -0.64).

Layers: each adaptive layer alone is moved to base+d for every d in [-R, R] (R = the controller's layer_range,
ranges unchanged, never below 2 bits); the offsets, summing to zero, are chosen to maximise the summed measured
gains minus costs (exactly, by dynamic programming). Moved together the layers interact, so the one-bit steps are
paired (largest marginal gain with cheapest marginal cost), added one pair at a time, and the prefix with the
lowest joint error is kept. The mean bit (FAB) stays at the base, and where no raise pays for a step down the
allocation is the fixed-bit one.

Images: with the layer bits chosen, every crop is run with all adaptive layers one bit up and one bit down. The
controller's calibrated thresholds are kept (AdaBM's percentiles); of the paper's direction (complex images up,
simple down), the reverse one and none, the one with the best mean PSNR change on the crops is kept.

Every choice is made on one set of calibration crops and kept only if it also lowers the error on a second,
held-out set: the per-layer effects of +-1 bit are small next to the crop-to-crop spread, and an allocation fitted
to noise loses on test images (measured on IMDN x4 W4A4: -1.1 dB on Set5 before fine-tuning without this check).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from srquant.methods.adabm.controller import BitController, image_complexity
from srquant.quant.calibrators import best_range
from srquant.quant.quantize import fp_mode


@dataclass
class AllocationReport:
    """What the measured allocation found: per layer the gains of +1..+R bits and the costs of -1..-R bits
    (relative MSE), the layers raised and lowered with their offsets, the image direction and the mean PSNR change
    (dB) each direction gave on the crops."""

    layer_gain: list[list[float]] = field(default_factory=list)
    layer_cost: list[list[float]] = field(default_factory=list)
    raised: list[str] = field(default_factory=list)
    lowered: list[str] = field(default_factory=list)
    offsets: dict[str, int] = field(default_factory=dict)  # every moved layer's b_layer
    layer_change: float = 0.0  # relative MSE change of the chosen layer bits on the choice crops
    layer_held_out_change: float | None = None  # ... and on the held-out crops
    image_direction: int = 0
    image_gain_db: dict[int, float] = field(default_factory=dict)
    image_held_out_db: float | None = None


def best_offsets(gains: Sequence[Sequence[float]], costs: Sequence[Sequence[float]]) -> list[int]:
    """Per item an offset in [-len(costs[k]), len(gains[k])] summing to zero, maximising the summed gains of the
    raises minus the costs of the cuts; gains[k][j] is item k's gain at +(j+1), costs[k][j] its cost at -(j+1).

    Exact (dynamic programming over the running balance); a change is made only where it strictly pays.
    """
    best: dict[int, tuple[float, list[int]]] = {0: (0.0, [])}
    for up, down in zip(gains, costs, strict=True):
        options = [(0, 0.0)] + [(j + 1, g) for j, g in enumerate(up)] + [(-(j + 1), -c) for j, c in enumerate(down)]
        step: dict[int, tuple[float, list[int]]] = {}
        for balance, (value, chosen) in best.items():
            for offset, delta in options:
                key, total = balance + offset, value + delta
                if key not in step or total > step[key][0]:
                    step[key] = (total, [*chosen, offset])
        best = step
    return best[0][1]


def one_bit_steps(
    offsets: Sequence[int], gains: Sequence[Sequence[float]], costs: Sequence[Sequence[float]]
) -> tuple[list[int], list[int]]:
    """The offsets as one-bit steps: (raises, cuts), each a list of item indices, raises by marginal gain
    (largest first), cuts by marginal cost (cheapest first); as many of each, since the offsets sum to zero."""
    raises: list[tuple[float, int]] = []
    cuts: list[tuple[float, int]] = []
    for k, offset in enumerate(offsets):
        for j in range(abs(offset)):
            table, out = (gains, raises) if offset > 0 else (costs, cuts)
            out.append((table[k][j] - (table[k][j - 1] if j else 0.0), k))
    raises.sort(key=lambda step: -step[0])
    cuts.sort(key=lambda step: step[0])
    return [k for _, k in raises], [k for _, k in cuts]


MIN_BITS = 2  # the measured allocation never moves a layer below this


RangeTable = dict[tuple[int, int], tuple[float, float]]  # (layer index, bits) -> clipped (lower, upper)


@torch.no_grad()
def ranges_per_bit(
    network: nn.Module, controller: BitController, crops: torch.Tensor, reach: int, samples: int = 1 << 18
) -> RangeTable:
    """Each adaptive layer's input range re-clipped for every bit it may move to (base +- reach, >= MIN_BITS):
    the least-MSE range among its current one scaled by 0.2..1.2, on its inputs over `crops` at the base bits.

    A layer moved to fewer bits keeps more of its error if its range is clipped for that bit, as bit-aware
    clipping does at the base; the allocation prices every move with the range it would get.
    """
    quantizers = [network.get_submodule(n).input_quantizer for n in controller.layer_names]
    inputs: list[torch.Tensor] = []
    generator = torch.Generator().manual_seed(0)

    def keep(q: nn.Module, args: tuple) -> None:
        values = args[0].detach().reshape(-1)
        if values.numel() > samples:
            values = values[torch.randperm(values.numel(), generator=generator)[:samples].to(values.device)]
        inputs.append(values.double()[None, :])

    handles = [q.register_forward_pre_hook(keep) for q in quantizers]
    try:
        network(crops)
    finally:
        for handle in handles:
            handle.remove()
    scales = torch.linspace(1.2, 0.2, 101, dtype=torch.float64, device=crops.device)[None, :]
    base, table = controller.base_bits, {}
    for k, (q, values) in enumerate(zip(quantizers, inputs, strict=True)):
        lo, hi = (float(v) for v in q.value_range())
        for bits in range(max(MIN_BITS, base - reach), base + reach + 1):
            if bits != base:
                lower, upper, _ = best_range(q, values, lo * scales, hi * scales, bits=bits)
                table[k, bits] = float(lower), float(upper)
    return table


class _Scorer:
    """Per-crop MSE of the quantized network against its float output, for chosen per-layer bits (a moved
    layer with its range from `ranges`, where given)."""

    def __init__(
        self, network: nn.Module, controller: BitController, crops: torch.Tensor, ranges: RangeTable | None = None
    ) -> None:
        self.network, self.crops, self.ranges = network, crops, ranges or {}
        self.base = controller.base_bits
        self.quantizers = [network.get_submodule(n).input_quantizer for n in controller.layer_names]
        with fp_mode(network):
            self.target = network(crops)

    def mse(self, bits: Sequence[int]) -> torch.Tensor:
        """Per-crop MSE with adaptive layer k at bits[k]."""
        with applied_ranges(self.quantizers, self.ranges, bits):
            for q, b in zip(self.quantizers, bits, strict=True):
                q.bits_override = torch.full((self.crops.shape[0],), float(b), device=self.crops.device)
            try:
                out = self.network(self.crops)
            finally:
                for q in self.quantizers:
                    q.bits_override = None
        return (out - self.target).double().pow(2).flatten(1).mean(dim=1)


@contextlib.contextmanager
def applied_ranges(quantizers: Sequence[nn.Module], ranges: RangeTable, bits: Sequence[int]) -> Iterator[None]:
    """Every layer whose bits have a range in `ranges` quantizes with it for a while, then gets its own back."""
    saved = []
    for k, (q, b) in enumerate(zip(quantizers, bits, strict=True)):
        if (k, b) in ranges:
            saved.append((q, {name: v.clone() for name, v in q.state_dict().items()}))
            q.set_range(*ranges[k, b])
    try:
        yield
    finally:
        for q, state in saved:
            q.load_state_dict(state)


def _psnr(mse: torch.Tensor) -> torch.Tensor:
    """PSNR of [0, 1] outputs from per-crop MSE."""
    return 10 * torch.log10(1 / mse.clamp_min(1e-12))


def _image_gain(scorer: _Scorer, controller: BitController, layer_bits: list[int]) -> dict[int, float]:
    """Mean PSNR change (dB) per crop of each image direction, with the controller's thresholds."""
    now = _psnr(scorer.mse(layer_bits))
    up = _psnr(scorer.mse([b + 1 for b in layer_bits])) - now
    down = now - _psnr(scorer.mse([b - 1 for b in layer_bits]))
    c = image_complexity(scorer.crops)
    high = (c > controller.measure_u).double()
    low = (c < controller.measure_l).double()
    return {
        0: 0.0,
        1: float((up * high).sum() - (down * low).sum()) / len(c),
        -1: float((up * low).sum() - (down * high).sum()) / len(c),
    }


@torch.no_grad()
def measured_allocation(
    network: nn.Module, controller: BitController, crops: torch.Tensor, held_out: torch.Tensor, *, reclip: bool
) -> AllocationReport:
    """Set the controller's layer offsets and image direction from measured output errors on `crops`, keeping a
    change only if it also lowers the error on the `held_out` crops (else the fixed-bit choice). With `reclip`
    every move is priced with its layer's range clipped for the new bit (`ranges_per_bit`), which the moved
    layers then keep."""
    ranges = ranges_per_bit(network, controller, crops, controller.layer_range) if reclip else None
    choose, check = _Scorer(network, controller, crops, ranges), _Scorer(network, controller, held_out, ranges)
    base, n = controller.base_bits, len(controller.layer_names)
    flat = [base] * n
    base_mse = float(choose.mse(flat).mean())
    report = AllocationReport()
    bits = list(flat)
    if controller.layer2bit:
        reach = controller.layer_range
        for k in range(n):
            for sign, out in ((1, report.layer_gain), (-1, report.layer_cost)):
                changes = []
                for d in range(1, reach + 1):
                    if base + sign * d < MIN_BITS:
                        break
                    moved = list(flat)
                    moved[k] = base + sign * d
                    changes.append(float(choose.mse(moved).mean()) / base_mse - 1)
                out.append([-c for c in changes] if sign == 1 else changes)
        offsets = best_offsets(report.layer_gain, report.layer_cost)
        raises, cuts = one_bit_steps(offsets, report.layer_gain, report.layer_cost)
        best_mse, trial = base_mse, list(flat)
        for up, down in zip(raises, cuts, strict=True):  # the steps together interact: keep the best prefix
            trial[up] += 1
            trial[down] -= 1
            joint = float(choose.mse(trial).mean())
            if joint < best_mse:
                best_mse, bits = joint, list(trial)
        report.layer_change = best_mse / base_mse - 1
        if bits != flat:
            report.layer_held_out_change = float(check.mse(bits).mean()) / float(check.mse(flat).mean()) - 1
            if report.layer_held_out_change >= 0:
                bits = list(flat)  # what paid on the choice crops does not pay on others: noise, not signal
        report.offsets = {name: b - base for name, b in zip(controller.layer_names, bits, strict=True) if b != base}
        report.raised = [name for name, d in report.offsets.items() if d > 0]
        report.lowered = [name for name, d in report.offsets.items() if d < 0]
        offsets_now = torch.tensor([b - base for b in bits], dtype=controller.measure_layer.dtype)
        controller.measure_layer.copy_(offsets_now)
        for k, b in enumerate(bits):  # a moved layer keeps the range it was priced with
            if (k, b) in choose.ranges:
                choose.quantizers[k].set_range(*choose.ranges[k, b])
        choose.ranges = check.ranges = {}  # an image bit moves a layer with the range it now has
    if controller.image2bit:
        report.image_gain_db = _image_gain(choose, controller, bits)
        direction = max((0, 1, -1), key=lambda d: report.image_gain_db[d])  # ties: no image bit
        if direction:
            report.image_held_out_db = _image_gain(check, controller, bits)[direction]
            direction = direction if report.image_held_out_db > 0 else 0
        report.image_direction = direction
        controller.image_direction.fill_(float(direction))
    return report
