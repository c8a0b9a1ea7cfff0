"""srquant's measured bit allocation for AdaBM: which layers and which images get +1 or -1 bit, chosen from what
each change does to the output error on calibration crops rather than from AdaBM's proxies.

Why (docs/results/adabm_sensitivity_*.md): on IMDN x4 at W4A4 the input std that Layer2Bit ranks is anti-
correlated with what a bit removed costs (Spearman -0.31), and a step down costs about 30x what a step up gains,
so its 30%-up / 30%-down split doubles the output error at the same FAB. Image2Bit raises complex crops and lowers
simple ones, but simple crops lose the most PSNR from a bit removed (Spearman(complexity, cost) -0.64).

Layers: each adaptive layer alone is moved to base+1 and base-1 (ranges unchanged); as many layers are raised as
lowered, chosen to maximise the summed measured gains minus costs (exactly, by dynamic programming). Moved
together the layers interact, so the pairs (best gain with cheapest cost) are added one at a time and the prefix
with the lowest joint error is kept. The mean bit (FAB) stays at the base, and where no raise pays for a step
down the allocation is the fixed-bit one.

Images: with the layer bits chosen, every crop is run with all adaptive layers one bit up and one bit down. The
controller's calibrated thresholds are kept (AdaBM's percentiles); of the paper's direction (complex images up,
simple down), the reverse one and none, the one with the best mean PSNR change on the crops is kept.

Every choice is made on one set of calibration crops and kept only if it also lowers the error on a second,
held-out set: the per-layer effects of +-1 bit are small next to the crop-to-crop spread, and an allocation fitted
to noise loses on test images (measured on IMDN x4 W4A4: -1.1 dB on Set5 before fine-tuning without this check).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from srquant.methods.adabm.controller import BitController, image_complexity
from srquant.quant.quantize import fp_mode


@dataclass
class AllocationReport:
    """What the measured allocation found: per-layer gains and costs (relative MSE), the layers raised and lowered,
    the image direction and the mean PSNR change (dB) each direction gave on the crops."""

    layer_gain: list[float] = field(default_factory=list)
    layer_cost: list[float] = field(default_factory=list)
    raised: list[str] = field(default_factory=list)
    lowered: list[str] = field(default_factory=list)
    layer_change: float = 0.0  # relative MSE change of the chosen layer bits on the choice crops
    layer_held_out_change: float | None = None  # ... and on the held-out crops
    image_direction: int = 0
    image_gain_db: dict[int, float] = field(default_factory=dict)
    image_held_out_db: float | None = None


def best_offsets(gain: Sequence[float], cost: Sequence[float]) -> list[int]:
    """Per item +1, 0 or -1, as many +1 as -1, maximising the summed gains of the +1s minus the costs of the -1s.

    Exact (dynamic programming over the running balance); a change is made only where it strictly pays.
    """
    n = len(gain)
    best: dict[int, tuple[float, list[int]]] = {0: (0.0, [])}
    for g, c in zip(gain, cost, strict=True):
        step: dict[int, tuple[float, list[int]]] = {}
        for balance, (value, chosen) in best.items():
            for offset, delta in ((0, 0.0), (1, g), (-1, -c)):
                key, total = balance + offset, value + delta
                if abs(key) <= n and (key not in step or total > step[key][0]):
                    step[key] = (total, [*chosen, offset])
        best = step
    return best[0][1]


class _Scorer:
    """Per-crop MSE of the quantized network against its float output, for chosen per-layer bits."""

    def __init__(self, network: nn.Module, controller: BitController, crops: torch.Tensor) -> None:
        self.network, self.crops = network, crops
        self.quantizers = [network.get_submodule(n).input_quantizer for n in controller.layer_names]
        with fp_mode(network):
            self.target = network(crops)

    def mse(self, bits: Sequence[int]) -> torch.Tensor:
        """Per-crop MSE with adaptive layer k at bits[k]."""
        for q, b in zip(self.quantizers, bits, strict=True):
            q.bits_override = torch.full((self.crops.shape[0],), float(b), device=self.crops.device)
        try:
            out = self.network(self.crops)
        finally:
            for q in self.quantizers:
                q.bits_override = None
        return (out - self.target).double().pow(2).flatten(1).mean(dim=1)


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
    network: nn.Module, controller: BitController, crops: torch.Tensor, held_out: torch.Tensor
) -> AllocationReport:
    """Set the controller's layer offsets and image direction from measured output errors on `crops`, keeping a
    change only if it also lowers the error on the `held_out` crops (else the fixed-bit choice)."""
    choose, check = _Scorer(network, controller, crops), _Scorer(network, controller, held_out)
    base, n = controller.base_bits, len(controller.layer_names)
    flat = [base] * n
    base_mse = float(choose.mse(flat).mean())
    report = AllocationReport()
    bits = list(flat)
    if controller.layer2bit:
        for k in range(n):
            for delta, out in ((1, report.layer_gain), (-1, report.layer_cost)):
                moved = list(flat)
                moved[k] = base + delta
                change = float(choose.mse(moved).mean()) / base_mse - 1
                out.append(-change if delta == 1 else change)
        offsets = best_offsets(report.layer_gain, report.layer_cost)
        ups = sorted((k for k in range(n) if offsets[k] == 1), key=lambda k: -report.layer_gain[k])
        downs = sorted((k for k in range(n) if offsets[k] == -1), key=lambda k: report.layer_cost[k])
        best_mse, trial = base_mse, list(flat)
        for up, down in zip(ups, downs, strict=True):  # the pairs together interact: keep the best prefix
            trial[up], trial[down] = base + 1, base - 1
            joint = float(choose.mse(trial).mean())
            if joint < best_mse:
                best_mse, bits = joint, list(trial)
        report.layer_change = best_mse / base_mse - 1
        if bits != flat:
            report.layer_held_out_change = float(check.mse(bits).mean()) / float(check.mse(flat).mean()) - 1
            if report.layer_held_out_change >= 0:
                bits = list(flat)  # what paid on the choice crops does not pay on others: noise, not signal
        report.raised = [name for name, b in zip(controller.layer_names, bits, strict=True) if b > base]
        report.lowered = [name for name, b in zip(controller.layer_names, bits, strict=True) if b < base]
        offsets_now = torch.tensor([b - base for b in bits], dtype=controller.measure_layer.dtype)
        controller.measure_layer.copy_(offsets_now)
    if controller.image2bit:
        report.image_gain_db = _image_gain(choose, controller, bits)
        direction = max((0, 1, -1), key=lambda d: report.image_gain_db[d])  # ties: no image bit
        if direction:
            report.image_held_out_db = _image_gain(check, controller, bits)[direction]
            direction = direction if report.image_held_out_db > 0 else 0
        report.image_direction = direction
        controller.image_direction.fill_(float(direction))
    return report
