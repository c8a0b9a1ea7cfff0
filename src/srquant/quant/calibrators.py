"""Calibrators: collect what a quantizer sees during calibration and propose its bounds.

All share `begin_pass(i)`, `collect(x)` and `compute() -> (lower, upper)`; `passes` says how many forward
passes over the calibration batches they need. Every calibrator refuses NaN/inf inputs with an error that
names the quantizer, since bounds computed from them would silently ruin the model.
"""

from __future__ import annotations

import math

import torch

from srquant.errors import SrquantError


def _rows(x: torch.Tensor, groups: int) -> torch.Tensor:
    """The tensor as (groups, -1) float32 rows."""
    return x.detach().reshape(groups, -1).float()


class RangeCalibrator:
    """Base: per-group running min/max over everything seen, with a NaN/inf check."""

    passes = 1

    def __init__(self, name: str, groups: int = 1) -> None:
        self.name = name
        self.groups = groups
        self.lo = torch.full((groups,), math.inf)
        self.hi = torch.full((groups,), -math.inf)
        self.pass_index = 0

    def begin_pass(self, index: int) -> None:
        self.pass_index = index

    def _check(self, rows: torch.Tensor) -> None:
        if not torch.isfinite(rows).all():
            raise SrquantError(f"non-finite values (NaN/inf) reached quantizer {self.name} during calibration")

    def collect(self, x: torch.Tensor) -> None:
        rows = _rows(x, self.groups)
        self._check(rows)
        self.lo = torch.minimum(self.lo, rows.amin(dim=1))
        self.hi = torch.maximum(self.hi, rows.amax(dim=1))

    def saw_data(self) -> bool:
        """False for quantizers that no calibration batch reached (e.g. upsamplers of other scales)."""
        return bool(torch.isfinite(self.lo).all())

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.saw_data():
            raise SrquantError(f"quantizer {self.name} saw no data during calibration")
        return self.lo.clone(), self.hi.clone()


class MinMaxCalibrator(RangeCalibrator):
    """Bounds = the minimum and maximum over all calibration batches."""


class PercentileCalibrator(RangeCalibrator):
    """Bounds = the (100-p)th and p-th percentiles of each batch, averaged over batches.

    Averaging per-batch percentiles keeps memory flat; for weights (one tensor) it is the exact percentile.
    """

    def __init__(self, name: str, groups: int = 1, percentile: float = 99.99) -> None:
        super().__init__(name, groups)
        if not 50.0 < percentile <= 100.0:
            raise SrquantError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile
        self.sum_lo = torch.zeros(groups)
        self.sum_hi = torch.zeros(groups)
        self.batches = 0

    def collect(self, x: torch.Tensor) -> None:
        rows = _rows(x, self.groups)
        self._check(rows)
        n = rows.shape[1]
        k_hi = min(n, max(1, math.ceil(self.percentile / 100.0 * n)))
        k_lo = max(1, n + 1 - k_hi)
        self.sum_lo += rows.kthvalue(k_lo, dim=1).values
        self.sum_hi += rows.kthvalue(k_hi, dim=1).values
        self.lo = torch.minimum(self.lo, rows.amin(dim=1))
        self.batches += 1

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.batches == 0:
            raise SrquantError(f"quantizer {self.name} saw no data during calibration")
        return self.sum_lo / self.batches, self.sum_hi / self.batches


def quant_error(values: torch.Tensor, weights: torch.Tensor, lower: float, upper: float, bits: int) -> torch.Tensor:
    """Weighted squared error sum(w * (v - q(v))^2) of the asymmetric quantizer with bounds (lower, upper)."""
    step = max(upper - lower, 1e-12) / (2**bits - 1)
    q = torch.round((values.clamp(lower, upper) - lower) / step) * step + lower
    return (weights * (values - q) ** 2).sum()


class DobiCalibrator(RangeCalibrator):
    """DOBI (2DQuant, Alg. 1): pick the bounds with the smallest L2 quantization error among 100 candidates.

    Pass 1 finds min and max; pass 2 accumulates a fine histogram of every value over all batches; the
    candidates are scored on it. Two-sided search (bell-shaped tensors) shrinks both bounds by i*D with
    D = (max-min)/2K; one-sided search (post-softmax / post-GELU) keeps the minimum and lowers the maximum
    by i*D with D = (max-min)/K.
    """

    passes = 2

    def __init__(
        self,
        name: str,
        groups: int = 1,
        bits: int = 4,
        one_sided: bool = False,
        candidates: int = 100,
        bins: int = 16384,
    ) -> None:
        super().__init__(name, groups)
        self.bits = bits
        self.one_sided = one_sided
        self.candidates = candidates
        self.bins = bins
        self.hist = torch.zeros(groups, bins, dtype=torch.float64)

    def collect(self, x: torch.Tensor) -> None:
        if self.pass_index == 0:
            super().collect(x)
            return
        rows = _rows(x, self.groups)
        self._check(rows)
        for g in range(self.groups):
            lo, hi = float(self.lo[g]), float(self.hi[g])
            if hi > lo:
                self.hist[g] += torch.histc(rows[g], bins=self.bins, min=lo, max=hi).double()

    def candidate_bounds(self, lo: float, hi: float) -> list[tuple[float, float]]:
        """The K (lower, upper) pairs DOBI scores."""
        if self.one_sided:
            delta = (hi - lo) / self.candidates
            return [(lo, hi - i * delta) for i in range(self.candidates)]
        delta = (hi - lo) / (2 * self.candidates)
        return [(lo + i * delta, hi - i * delta) for i in range(self.candidates)]

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo_all, hi_all = super().compute()
        lower, upper = lo_all.clone(), hi_all.clone()
        for g in range(self.groups):
            lo, hi = float(lo_all[g]), float(hi_all[g])
            if hi <= lo:
                continue
            width = (hi - lo) / self.bins
            centres = torch.linspace(lo + width / 2, hi - width / 2, self.bins, dtype=torch.float64)
            counts = self.hist[g]
            errors = [
                quant_error(centres, counts, lo_c, hi_c, self.bits) for lo_c, hi_c in self.candidate_bounds(lo, hi)
            ]
            best = int(torch.stack(errors).argmin())
            lower[g], upper[g] = self.candidate_bounds(lo, hi)[best]
        return lower, upper


def search_error_exact(x: torch.Tensor, bits: int, one_sided: bool, candidates: int = 100) -> tuple[float, float]:
    """DOBI on one tensor with exact errors (no histogram): used for weights and as a test reference."""
    lo, hi = float(x.min()), float(x.max())
    cal = DobiCalibrator("exact", bits=bits, one_sided=one_sided, candidates=candidates)
    ones = torch.ones_like(x.flatten(), dtype=torch.float64)
    errors = [quant_error(x.flatten().double(), ones, lo_c, hi_c, bits) for lo_c, hi_c in cal.candidate_bounds(lo, hi)]
    return cal.candidate_bounds(lo, hi)[int(torch.stack(errors).argmin())]
