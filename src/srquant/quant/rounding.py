"""Learned rounding (AdaRound, Nagel et al. 2020) on a weight quantizer's own grid, and quantization dropping
(QDrop, Wei et al. 2022) for activation quantizers: the two training-time mechanisms of block reconstruction.

`LearnedRounding(quantizer, weight)` keeps the quantizer's grid fixed and learns, per weight element, whether to
round down or up: codes = clamp(floor(w/s + z) + h(V), qmin, qmax), with h(V) = clamp(sigmoid(V) (zeta - gamma) +
gamma, 0, 1) starting at the fractional part (so the first forward pass equals plain rounding's neighbourhood), and
`regularizer(beta)` = sum(1 - |2 h(V) - 1|^beta) pushing h to 0 or 1. Attached to a weight quantizer
(`attach_rounding`), the quantizer's forward uses the soft codes while autograd records and the hard ones
otherwise; `fold_rounding` writes the hard codes into the weight (values on the grid, so checkpoints pack them
as integer codes and exports use them) and detaches it.

`set_drop(quantizers, probability, generator)`: while autograd records, each element of a quantized activation
keeps its float value with that probability (QDrop), so a block learns ranges that do not over-fit one input.
The masks are cut from one seeded pool at random offsets (`DropMask`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from srquant.quant.quantizers import Quantizer

ZETA, GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid


class LearnedRounding(nn.Module):
    """Per-element learnable rounding offsets of one weight on its quantizer's (fixed) grid."""

    def __init__(self, quantizer: Quantizer, weight: torch.Tensor) -> None:
        super().__init__()
        grid = quantizer.grid()
        self.grid, self.shape = grid, weight.shape
        scaled = grid.view(weight.detach()) / grid.scale + grid.zero_point
        self.register_buffer("floor", torch.floor(scaled))
        rest = (scaled - self.floor).clamp(1e-4, 1 - 1e-4)
        self.offset = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))  # h(offset) = rest

    def h(self) -> torch.Tensor:
        """The rectified sigmoid: the soft rounding decision in [0, 1]."""
        return torch.clamp(torch.sigmoid(self.offset) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def codes(self, soft: bool) -> torch.Tensor:
        """Integer codes (hard: round up where h >= 0.5) or their soft relaxation, in the grid's view."""
        up = self.h() if soft else (self.offset.detach() >= 0).to(self.floor.dtype)
        return torch.clamp(self.floor + up, *self.grid._limits(self.floor))

    def forward(self, soft: bool) -> torch.Tensor:
        """The weight's values (soft or hard), in the weight's shape."""
        return self.grid.values_of(self.codes(soft)).reshape(self.shape)

    def regularizer(self, beta: float) -> torch.Tensor:
        """AdaRound's term driving every h to 0 or 1 (weighted by the caller's annealed lambda)."""
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()


def attach_rounding(module: nn.Module) -> LearnedRounding:
    """Give a quantized layer's weight quantizer learned rounding (starting at its current rounding)."""
    quantizer = module.weight_quantizer
    rounding = LearnedRounding(quantizer, module.weight).to(module.weight.device)
    quantizer.rounding = rounding
    return rounding


@torch.no_grad()
def fold_rounding(module: nn.Module) -> None:
    """Write the learned (hard) codes' values into the weight and remove the rounding offsets."""
    quantizer = module.weight_quantizer
    rounding = quantizer.rounding
    if rounding is None:
        return
    module.weight.copy_(rounding(soft=False))
    quantizer.rounding = None


class DropMask:
    """QDrop's random element masks, cut from one pre-drawn pool at random offsets: drawing a fresh random number
    per element at every step cost more than the block's convolutions on the CPU."""

    def __init__(self, probability: float, generator: torch.Generator) -> None:
        self.probability, self.generator = probability, generator
        self.pool = torch.zeros(0, dtype=torch.bool, device=generator.device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        count = x.numel()
        if self.pool.numel() < 2 * count:
            draws = torch.rand(4 * count, generator=self.generator, device=self.generator.device)
            self.pool = (draws < self.probability).to(x.device)
        top = self.pool.numel() - count + 1
        start = int(torch.randint(top, (1,), generator=self.generator, device=self.generator.device))
        return self.pool[start : start + count].view(x.shape)


def set_drop(quantizers: Iterable[Quantizer], probability: float, generator: torch.Generator | None = None) -> None:
    """Switch QDrop on (probability > 0, with a seeded generator) or off for activation quantizers."""
    if not 0.0 <= probability < 1.0:
        raise ValueError(f"drop probability must be in [0, 1), got {probability}")
    mask = DropMask(probability, generator or torch.Generator()) if probability > 0 else None
    for quantizer in quantizers:
        quantizer.drop = mask


def annealed_beta(step: int, total: int, start: float = 20.0, end: float = 2.0, warmup: float = 0.2) -> float:
    """AdaRound's beta: held at `start` for the warm-up share of the steps, then decayed (cosine) to `end`."""
    begin = int(warmup * total)
    if step < begin:
        return start
    progress = (step - begin) / max(total - begin, 1)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * progress))
