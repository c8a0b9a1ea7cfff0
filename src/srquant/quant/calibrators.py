"""Calibrators: collect what a quantizer sees during calibration and propose its range, per row.

All share `begin_pass(i)`, `collect(x)`, `saw_data()` and `compute() -> (lower, upper)` (one value per row of
the quantizer: per tensor, per output channel or per slice); `passes` says how many forward passes over the
calibration batches they need. A `static` calibrator belongs to a weight quantizer: the tensor it sees is the
same in every batch, so it is looked at once per pass. Every calibrator refuses NaN/inf inputs with an error
that names the quantizer. Candidate ranges are scored on the quantizer's own grid (`Quantizer.grid_for`), so
one search serves asymmetric, symmetric and LSQ grids alike: DOBI, AdaBM's weight search and its bit-aware
clipping all use `best_range`.

`run_calibration` shows the calibration batches to the model's quantizers with quantization off;
`apply_ranges` gives each quantizer its range and switches quantization on.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn
from tqdm import tqdm

from srquant.errors import SrquantError
from srquant.quant.grid import rows_of
from srquant.quant.quantize import mode_scope, quantizers
from srquant.quant.quantizers import Quantizer, QuantMode

log = logging.getLogger(__name__)
CHUNK_ELEMENTS = 1 << 23  # candidate x value elements scored at once (about 32 MB of float32)


class RangeCalibrator:
    """Base: per-row running min/max over everything seen, with a NaN/inf check."""

    passes = 1

    def __init__(self, name: str, quantizer: Quantizer, static: bool = False) -> None:
        self.name = name
        self.quantizer = quantizer
        self.rows = quantizer.rows
        self.static = static
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None
        self.pass_index = 0
        self._seen_in_pass = False

    def begin_pass(self, index: int) -> None:
        self.pass_index = index
        self._seen_in_pass = False

    def _rows(self, x: torch.Tensor) -> torch.Tensor | None:
        """The tensor as (rows, -1) float32, checked; None for a static tensor already seen in this pass."""
        if self.static and self._seen_in_pass:
            return None
        self._seen_in_pass = True
        rows = rows_of(x.detach(), self.rows, self.quantizer.axis).float()
        if not bool(torch.isfinite(rows).all()):
            raise SrquantError(f"non-finite values (NaN/inf) reached quantizer {self.name} during calibration")
        return rows

    def _update_range(self, rows: torch.Tensor) -> None:
        low, high = rows.amin(dim=1), rows.amax(dim=1)
        self.lo = low if self.lo is None else torch.minimum(self.lo, low)
        self.hi = high if self.hi is None else torch.maximum(self.hi, high)

    def collect(self, x: torch.Tensor) -> None:
        rows = self._rows(x)
        if rows is not None:
            self._update_range(rows)

    def saw_data(self) -> bool:
        """False for quantizers that no calibration batch reached (e.g. upsamplers of other scales)."""
        return self.lo is not None

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.lo is None or self.hi is None:
            raise SrquantError(f"quantizer {self.name} saw no data during calibration")
        return self.lo, self.hi

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        low, high = self._range()
        return low.clone(), high.clone()


class MinMaxCalibrator(RangeCalibrator):
    """Range = the minimum and maximum over all calibration batches."""


class EMAMinMaxCalibrator(RangeCalibrator):
    """Range = min and max of each batch, averaged across batches by an exponential moving average (AdaBM)."""

    def __init__(self, name: str, quantizer: Quantizer, static: bool = False, beta: float = 0.9) -> None:
        super().__init__(name, quantizer, static)
        self.beta = beta

    def collect(self, x: torch.Tensor) -> None:
        rows = self._rows(x)
        if rows is None:
            return
        low, high = rows.amin(dim=1), rows.amax(dim=1)
        if self.lo is None or self.hi is None:
            self.lo, self.hi = low, high
        else:
            self.lo = self.beta * self.lo + (1 - self.beta) * low
            self.hi = self.beta * self.hi + (1 - self.beta) * high


class PercentileCalibrator(RangeCalibrator):
    """Range = the (100-p)th and p-th percentiles of each batch, averaged over batches (exact for weights)."""

    def __init__(self, name: str, quantizer: Quantizer, static: bool = False, percentile: float = 99.99) -> None:
        super().__init__(name, quantizer, static)
        if not 50.0 < percentile <= 100.0:
            raise SrquantError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile
        self.sum_lo: torch.Tensor | None = None
        self.sum_hi: torch.Tensor | None = None
        self.batches = 0

    def collect(self, x: torch.Tensor) -> None:
        rows = self._rows(x)
        if rows is None:
            return
        self._update_range(rows)
        n = rows.shape[1]
        k_hi = min(n, max(1, math.ceil(self.percentile / 100.0 * n)))
        k_lo = max(1, n + 1 - k_hi)
        low, high = rows.kthvalue(k_lo, dim=1).values, rows.kthvalue(k_hi, dim=1).values
        self.sum_lo = low if self.sum_lo is None else self.sum_lo + low
        self.sum_hi = high if self.sum_hi is None else self.sum_hi + high
        self.batches += 1

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.sum_lo is None or self.sum_hi is None:
            raise SrquantError(f"quantizer {self.name} saw no data during calibration")
        return self.sum_lo / self.batches, self.sum_hi / self.batches


def range_errors(
    quantizer: Quantizer,
    values: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
    weights: torch.Tensor | None = None,
    bits: int | None = None,
) -> torch.Tensor:
    """Squared quantization error of each candidate range on the quantizer's grid: (rows, K).

    `values` (rows, N), optional `weights` (rows, N) (histogram counts), `lower`/`upper` (rows, K) candidates.
    """
    values = values.to(torch.float64)
    rows, count = values.shape
    per_chunk = max(1, CHUNK_ELEMENTS // max(rows * count, 1))
    errors = []
    for start in range(0, lower.shape[1], per_chunk):
        low = lower[:, start : start + per_chunk, None].to(torch.float64)
        high = upper[:, start : start + per_chunk, None].to(torch.float64)
        grid = quantizer.grid_for(low, high, bits)
        diff = grid.values_of(grid.codes_of(values[:, None, :])) - values[:, None, :]
        sq = diff.square_()
        errors.append((sq * weights[:, None, :] if weights is not None else sq).sum(dim=-1))
    return torch.cat(errors, dim=1)


def best_range(
    quantizer: Quantizer,
    values: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
    weights: torch.Tensor | None = None,
    bits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The candidate range with the least squared error per row: (lower, upper, index), each (rows,)."""
    index = range_errors(quantizer, values, lower, upper, weights, bits).argmin(dim=1)
    pick = index[:, None]
    return lower.gather(1, pick).squeeze(1), upper.gather(1, pick).squeeze(1), index


def dobi_candidates(
    lo: torch.Tensor, hi: torch.Tensor, count: int, one_sided: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """DOBI's K candidate ranges per row (2DQuant, Alg. 1): two-sided shrinks both ends by i*D, D = (max-min)/2K;
    one-sided keeps the minimum and lowers the maximum by i*D, D = (max-min)/K. Shapes (rows, K)."""
    steps = torch.arange(count, dtype=lo.dtype, device=lo.device)[None, :]
    span = (hi - lo)[:, None]
    if one_sided:
        return lo[:, None].expand(-1, count), hi[:, None] - steps * span / count
    delta = span / (2 * count)
    return lo[:, None] + steps * delta, hi[:, None] - steps * delta


class DobiCalibrator(RangeCalibrator):
    """DOBI (2DQuant, Alg. 1): the range with the smallest L2 quantization error among K candidates.

    Pass 1 finds min and max; pass 2 keeps a weight tensor exactly, or accumulates a fine histogram of every
    activation value over all batches; the candidates are scored on it (on the quantizer's own grid).
    """

    passes = 2

    def __init__(
        self, name: str, quantizer: Quantizer, static: bool = False, candidates: int = 100, bins: int = 16384
    ) -> None:
        super().__init__(name, quantizer, static)
        self.candidates = candidates
        self.bins = bins
        self.hist: torch.Tensor | None = None
        self.exact: torch.Tensor | None = None

    def collect(self, x: torch.Tensor) -> None:
        if self.pass_index == 0:
            super().collect(x)
            return
        rows = self._rows(x)
        if rows is None or self.lo is None or self.hi is None:
            return
        if self.static:
            self.exact = rows
            return
        if self.hist is None:
            self.hist = torch.zeros(self.rows, self.bins, dtype=torch.float64, device=rows.device)
        for r in range(self.rows):
            lo, hi = float(self.lo[r]), float(self.hi[r])
            if hi > lo:
                self.hist[r] += torch.histc(rows[r], bins=self.bins, min=lo, max=hi).double()

    def _samples(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(values, weights) to score: the exact tensor, or histogram bin centres with their counts."""
        if self.exact is not None:
            return self.exact, None
        low, high = self._range()
        fractions = (torch.arange(self.bins, dtype=torch.float64, device=low.device) + 0.5) / self.bins
        centres = low.double()[:, None] + (high - low).double()[:, None] * fractions[None, :]
        counts = self.hist if self.hist is not None else torch.zeros_like(centres)
        return centres, counts

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        low, high = self._range()
        lower, upper = dobi_candidates(low.double(), high.double(), self.candidates, self.quantizer.one_sided)
        values, weights = self._samples()
        best_lo, best_hi, _ = best_range(self.quantizer, values, lower, upper, weights)
        flat = high <= low  # a constant row keeps its (degenerate) min/max
        return torch.where(flat, low, best_lo.to(low.dtype)), torch.where(flat, high, best_hi.to(high.dtype))


class DensityClipCalibrator(RangeCalibrator):
    """PTQ4SR's density-based dual clipping (DBDC): whole end bins of each batch's activation histogram (2048 bins
    over its min/max) are cut, the sparser end first, until no more than a share 1 - `tail` of the values is
    kept (so at least `tail` is cut, more when an end bin is dense, as in the released code), and the kept range's
    edges are averaged over the batches. Weights (static) keep their plain per-row min/max, as the
    released code's per-channel weights do. `tail` defaults to 1e-4, and 1e-5 for 8-bit quantizers (the code's
    effective values)."""

    def __init__(self, name: str, quantizer: Quantizer, static: bool = False, tail: float | None = None) -> None:
        super().__init__(name, quantizer, static)
        self.tail = tail if tail is not None else (1e-5 if quantizer.bits >= 8 else 1e-4)
        self.bins = 2048
        self.sum_lo: torch.Tensor | None = None
        self.sum_hi: torch.Tensor | None = None
        self.batches = 0

    def _clip(self, row: torch.Tensor) -> tuple[float, float]:
        low, high = float(row.min()), float(row.max())
        if high <= low:
            return low, high
        counts = torch.histc(row, bins=self.bins, min=low, max=high).tolist()
        first, last, kept = 0, self.bins - 1, float(row.numel())
        limit = (1 - self.tail) * row.numel()
        while kept > limit and first < last:
            if counts[first] < counts[last]:
                kept -= counts[first]
                first += 1
            else:
                kept -= counts[last]
                last -= 1
        width = (high - low) / self.bins
        return low + width * first, low + width * (last + 1)

    def collect(self, x: torch.Tensor) -> None:
        rows = self._rows(x)
        if rows is None:
            return
        self._update_range(rows)
        if self.static:
            return
        ranges = torch.tensor([self._clip(row) for row in rows], dtype=torch.float32, device=rows.device)
        self.sum_lo = ranges[:, 0] if self.sum_lo is None else self.sum_lo + ranges[:, 0]
        self.sum_hi = ranges[:, 1] if self.sum_hi is None else self.sum_hi + ranges[:, 1]
        self.batches += 1

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.static or self.sum_lo is None or self.sum_hi is None:
            return super().compute()
        return self.sum_lo / self.batches, self.sum_hi / self.batches


CalibratorFactory = Callable[[str, Quantizer, bool], RangeCalibrator]


def calibrator_factory(kind: str, percentile: float = 99.99) -> CalibratorFactory:
    """`factory(name, quantizer, static)` for a calibration kind: minmax, percentile, dobi or dbdc."""
    if kind == "minmax":
        return MinMaxCalibrator
    if kind == "percentile":
        return lambda name, q, static: PercentileCalibrator(name, q, static, percentile)
    if kind == "dobi":
        return DobiCalibrator
    if kind == "dbdc":
        return DensityClipCalibrator
    raise SrquantError(f"unknown calibration kind {kind!r}; choose from minmax, percentile, dobi, dbdc")


def is_weight_quantizer(name: str) -> bool:
    """True for a layer's weight quantizer (its tensor is the same in every batch)."""
    return name.rpartition(".")[2] == "weight_quantizer"


@torch.no_grad()
def run_calibration(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    calibrators: Mapping[str, RangeCalibrator],
    progress: bool = False,
    label: str = "calibration",
) -> None:
    """Show every batch to the named quantizers' calibrators, with quantization off, as many passes as they need.

    The model is put in eval mode for the passes (no normalisation statistics move) and restored after.
    """
    if not batches:
        raise SrquantError("calibration needs at least one batch")
    named = dict(quantizers(model))
    missing = [name for name in calibrators if name not in named]
    if missing:
        raise SrquantError(f"no quantizer named {missing[0]} in the model")
    for name, cal in calibrators.items():
        named[name].calibrator = cal
    passes = max((c.passes for c in calibrators.values()), default=1)
    was_training = model.training
    model.eval()
    try:
        with mode_scope(model, QuantMode.CALIBRATE):
            for index in range(passes):
                for cal in calibrators.values():
                    cal.begin_pass(index)
                desc = f"{label} pass {index + 1}/{passes}"
                for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
                    model(batch)
    finally:
        for name in calibrators:
            named[name].calibrator = None
        model.train(was_training)


def apply_ranges(model: nn.Module, calibrators: Mapping[str, RangeCalibrator]) -> list[str]:
    """Give each calibrated quantizer its range and switch it on; those no batch reached stay FP (returned)."""
    named = dict(quantizers(model))
    unused = []
    for name, cal in calibrators.items():
        if not cal.saw_data():
            unused.append(name)
            named[name].mode = QuantMode.FP
            continue
        lower, upper = cal.compute()
        try:
            named[name].set_range(lower, upper)
        except FloatingPointError as err:
            raise SrquantError(f"calibration of {name} produced an invalid range: {err}") from None
        named[name].mode = QuantMode.QUANT
    if unused:
        log.info("%d quantizers saw no calibration data and stay FP (first: %s)", len(unused), unused[0])
    return unused
