"""Fake quantizers shared by every method: asymmetric two-bound (2DQuant), symmetric (AdaBM weights, int8
kernels), LSQ (Granular-DQ) and LSQ with one quantizer per candidate bit (Granular-DQ's patch-wise bits).

Each quantizer is an `nn.Module` with a mode: `FP` passes tensors through, `CALIBRATE` shows them to an
attached calibrator and passes them through (statistics are collected with quantization off), `QUANT`
fake-quantizes. Each owns its grid (`grid()`: scale, zero point, integer range, rows, bits), the grid it would
take for a proposed range (`grid_for`), and how it adopts a range (`set_range`); inference rounds with the grid
itself, so integer codes, checkpoints and exported graphs agree with the model exactly. Training uses each
kind's own gradient rule. Weight quantizers may hold one set of parameters per slice of the output dimension
(`rows`: per output channel, or per slice of a fused weight); two-bound activation quantizers may hold one per
equal part of the channels (`rows` with `axis=1`: the parts of a concatenation). The bit-width is an int, or
a per-sample tensor set by dynamic methods (`bits_override`).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import nn

from srquant.errors import SrquantError
from srquant.quant.grid import Grid, asymmetric_grid, lsq_grid, lsq_range, rows_view, symmetric_grid


class QuantMode(enum.Enum):
    """What a quantizer does with its input."""

    FP = "fp"
    CALIBRATE = "calibrate"
    QUANT = "quant"


class Calibrator(Protocol):
    """Collects statistics of the tensors a quantizer sees during calibration."""

    def collect(self, x: torch.Tensor) -> None: ...


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity gradient in the backward pass (straight-through estimator)."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return torch.round(x)
    return x + (torch.round(x) - x).detach()


def straight_through(soft: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
    """The hard value forward, the gradient of a soft surrogate backward (AdaBM's bits, Granular-DQ's gates)."""
    return soft - soft.detach() + hard.detach()


def _sum_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a broadcast gradient back to a parameter's shape."""
    if grad.shape == shape:
        return grad
    lead = grad.dim() - len(shape)
    grad = grad.sum(dim=tuple(range(lead))) if lead > 0 else grad
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    return grad.sum(dim=dims, keepdim=True) if dims else grad


class BoundClip(torch.autograd.Function):
    """clip(x, lower, upper) with 2DQuant's gradient rule.

    Elements inside [lower, upper] pass their gradient to x; each bound receives the SUM of the upstream
    gradients of the elements beyond it (PyTorch's clamp would give the bounds nothing).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, lower, upper)
        return torch.minimum(torch.maximum(x, lower), upper)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # type: ignore[override]
        x, lower, upper = ctx.saved_tensors
        below, above = x < lower, x > upper
        grad_x = grad * ~(below | above)
        grad_lower = _sum_to(grad * below, lower.shape)
        grad_upper = _sum_to(grad * above, upper.shape)
        return grad_x, grad_lower, grad_upper


def fake_quant_asymmetric(
    x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, bits: int | torch.Tensor
) -> torch.Tensor:
    """2DQuant's quantizer with gradients: s = (u-l)/(2^b-1), q = s*round((clip(x,l,u)-l)/s) + l.

    Rounding is straight-through; the bounds get gradients through the clip, through s and through +l.
    """
    step = (upper - lower).clamp_min(1e-8) / (2**bits - 1)
    clipped = BoundClip.apply(x, lower, upper)
    return round_ste((clipped - lower) / step) * step + lower


def zero_aligned(
    lower: torch.Tensor, upper: torch.Tensor, bits: int | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift [lower, upper] by less than half a step so that 0 is a grid point (an integer zero point), with a
    straight-through rounding of the zero point (training path of `asymmetric_grid(..., align_zero=True)`)."""
    levels = 2**bits - 1
    step = (upper - lower).clamp_min(1e-8) / levels
    zero = round_ste(torch.clamp(-lower / step, 0, levels))
    aligned = -zero * step
    return aligned, aligned + levels * step


def _param_shape(rows: int) -> tuple[int, ...]:  # parameters are stored flat; `_rows_param` shapes them
    return (rows,) if rows > 1 else ()


class Quantizer(nn.Module):
    """Base class: modes, calibration hand-off, per-sample bits, and the grid interface every consumer uses.

    `rows` > 1 gives each slice of dimension `axis` its own parameters: of dimension 0 (per output channel, or
    per slice of a fused weight), or of the channel dimension 1 (per part of a concatenated input). `one_sided`
    marks inputs with an exponential-like distribution (post-softmax, post-GELU): DOBI keeps their lower bound at
    the minimum, LSQ gives them an unsigned grid.
    """

    def __init__(self, bits: int, rows: int = 1, one_sided: bool = False, axis: int = 0) -> None:
        super().__init__()
        if not 1 <= bits <= 16:
            raise ValueError(f"bit-width must be in [1, 16], got {bits}")
        if rows < 1:
            raise ValueError(f"rows must be >= 1, got {rows}")
        if axis not in (0, 1):
            raise ValueError(f"rows run along dimension 0 or 1, not {axis}")
        self.bits = bits
        self.rows = rows
        self.axis = axis
        self.one_sided = one_sided
        self.mode = QuantMode.FP
        self.calibrator: Calibrator | None = None
        self.bits_override: torch.Tensor | None = None
        self.rounding: nn.Module | None = None  # learned rounding of a weight (quant/rounding.py)
        self.drop: Callable[[torch.Tensor], torch.Tensor] | None = None  # QDrop's mask of elements kept float

    def bits_for(self, x: torch.Tensor | None = None) -> int | torch.Tensor:
        """The fixed bit-width, or the per-sample bits a dynamic method set (`bits_override`, shape (B,)) shaped to
        broadcast against x (repeated for inputs whose leading dimension is batch-major, e.g. windows per image)."""
        override = self.bits_override
        if override is None:
            return self.bits
        if x is None:
            raise SrquantError("per-sample bits have no single grid: clear bits_override first")
        override = override.reshape(-1)
        if x.shape[0] != override.shape[0]:
            if x.shape[0] % override.shape[0]:
                raise SrquantError(f"input batch {x.shape[0]} is not a multiple of the {override.shape[0]} sample bits")
            override = override.repeat_interleave(x.shape[0] // override.shape[0])
        dims = 3 if self.rows > 1 and self.axis == 1 else x.dim()  # the (batch, rows, -1) view of per-part grids
        return override.reshape(-1, *([1] * (dims - 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode is QuantMode.FP:
            return x
        if self.mode is QuantMode.CALIBRATE:
            if self.calibrator is not None:
                self.calibrator.collect(x.detach())
            return x
        if self.rounding is not None:  # a weight with learned rounding: soft codes in training, hard ones after
            return self.rounding(soft=torch.is_grad_enabled())
        out = self.quantize(x)
        if self.drop is not None and torch.is_grad_enabled():
            out = torch.where(self.drop(x), x, out)
        return out

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize: each kind's gradient rule when autograd records, the grid's own rounding otherwise."""
        if torch.is_grad_enabled():
            return self.train_quantize(x)
        return self.grid(x).fake(x)

    def view(self, x: torch.Tensor) -> torch.Tensor:
        """x as the parameters see it: (rows, -1), or (batch, rows, -1) along the channels, for per-row quantizers."""
        return rows_view(x, self.rows, self.axis)

    def _as_param(self, value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
        """A proposed per-row value as a tensor of a parameter's shape, dtype and device."""
        tensor = torch.as_tensor(value, dtype=like.dtype).to(like.device)
        if tensor.numel() == 1:
            return tensor.reshape(()).expand(like.shape).clone()
        return tensor.reshape(like.shape)

    def _rows_param(self, param: torch.Tensor) -> torch.Tensor:
        """A parameter shaped to broadcast against `view(x)`."""
        if self.rows == 1:
            return param
        return param.view(-1, 1) if self.axis == 0 else param.view(1, -1, 1)

    # The grid interface. -------------------------------------------------------------------------------------

    def grid(self, x: torch.Tensor | None = None) -> Grid:
        """The current grid (detached); with per-sample bits, the grid for the input `x`."""
        raise NotImplementedError

    def grid_for(self, lower: torch.Tensor, upper: torch.Tensor, bits: int | None = None) -> Grid:
        """The grid this quantizer would take for the range [lower, upper] (any broadcastable shapes; `rows` 1)."""
        raise NotImplementedError

    def set_range(self, lower: torch.Tensor | float, upper: torch.Tensor | float) -> None:
        """Adopt the grid for [lower, upper] (per row when the quantizer has rows); refuses non-finite ranges."""
        raise NotImplementedError

    def value_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (lowest, highest) representable values of the current grid, per row."""
        grid = self.grid()
        low = grid.values_of(torch.as_tensor(grid.qmin, dtype=grid.scale.dtype, device=grid.scale.device))
        high = grid.values_of(torch.as_tensor(grid.qmax, dtype=grid.scale.dtype, device=grid.scale.device))
        return low.reshape(-1).squeeze(0), high.reshape(-1).squeeze(0)

    def train_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Fake quantization with this kind's gradients (the grid's values up to float rounding)."""
        raise NotImplementedError

    def to_codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes of x on the current grid, as int64, x's shape."""
        return self.grid().to_codes(x.detach()).to(torch.int64)

    def from_codes(self, codes: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """The values of integer codes on the current grid."""
        return self.grid().from_codes(codes, shape)

    @staticmethod
    def _check_finite(*values: torch.Tensor) -> None:
        if not all(bool(torch.isfinite(v).all()) for v in values):
            raise FloatingPointError(f"non-finite range ({', '.join(str(v.tolist()) for v in values)})")

    def extra_repr(self) -> str:
        extras = f", rows={self.rows}" + (", axis=1" if self.axis else "") if self.rows > 1 else ""
        return f"bits={self.bits}, mode={self.mode.value}{extras}" + (", one_sided" if self.one_sided else "")


MIN_RANGE = 1e-6  # the narrowest range a two-bound quantizer takes (calibrated or trained)


class AsymmetricQuantizer(Quantizer):
    """Uniform asymmetric quantizer with two learnable bounds (2DQuant): weights and activations.

    With `align_zero` the grid is shifted by less than half a step so that zero is a grid point (an integer zero
    point), as uint8 kernels need.
    """

    def __init__(
        self, bits: int, rows: int = 1, one_sided: bool = False, align_zero: bool = False, axis: int = 0
    ) -> None:
        super().__init__(bits, rows, one_sided, axis)
        self.align_zero = align_zero
        self.lower_bound = nn.Parameter(torch.zeros(_param_shape(rows)))
        self.upper_bound = nn.Parameter(torch.ones(_param_shape(rows)))

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The bounds both paths use: training moves lower and upper independently and can cross them, so the
        upper one is taken as at least lower + MIN_RANGE (otherwise the clip of the training path and the grid
        of evaluation and export would read crossed bounds differently)."""
        lower = self._rows_param(self.lower_bound)
        return lower, torch.maximum(self._rows_param(self.upper_bound), lower + MIN_RANGE)

    def grid(self, x: torch.Tensor | None = None) -> Grid:
        lower, upper = (b.detach() for b in self.bounds())
        return asymmetric_grid(lower, upper, self.bits_for(x), self.align_zero, self.rows, self.axis)

    def grid_for(self, lower: torch.Tensor, upper: torch.Tensor, bits: int | None = None) -> Grid:
        return asymmetric_grid(lower, upper, bits or self.bits, self.align_zero)

    def set_range(self, lower: torch.Tensor | float, upper: torch.Tensor | float) -> None:
        low, high = self._as_param(lower, self.lower_bound), self._as_param(upper, self.upper_bound)
        self._check_finite(low, high)
        high = torch.maximum(high, low + MIN_RANGE)
        with torch.no_grad():
            self.lower_bound.copy_(low)
            self.upper_bound.copy_(high)

    def train_quantize(self, x: torch.Tensor) -> torch.Tensor:
        lower, upper = self.bounds()
        bits = self.bits_for(x)
        if self.align_zero:
            lower, upper = zero_aligned(lower, upper, bits)
        return fake_quant_asymmetric(self.view(x), lower, upper, bits).reshape(x.shape)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", align_zero" if self.align_zero else "")


class SymmetricQuantizer(Quantizer):
    """Symmetric quantizer on [-u, u] with one learnable bound u (AdaBM's weights; int8 kernels' weights).

    The grid has 2^(b-1) - 1 steps per side (zero exact); clipping follows 2DQuant's bound rule.
    """

    def __init__(self, bits: int, rows: int = 1, one_sided: bool = False) -> None:
        super().__init__(bits, rows, one_sided)
        self.upper_bound = nn.Parameter(torch.ones(_param_shape(rows)))

    def grid(self, x: torch.Tensor | None = None) -> Grid:
        return symmetric_grid(self._rows_param(self.upper_bound.detach()), self.bits_for(x), self.rows)

    def grid_for(self, lower: torch.Tensor, upper: torch.Tensor, bits: int | None = None) -> Grid:
        return symmetric_grid(
            torch.maximum(torch.as_tensor(lower).abs(), torch.as_tensor(upper).abs()), bits or self.bits
        )

    def set_range(self, lower: torch.Tensor | float, upper: torch.Tensor | float) -> None:
        low, high = self._as_param(lower, self.upper_bound), self._as_param(upper, self.upper_bound)
        self._check_finite(low, high)
        with torch.no_grad():
            self.upper_bound.copy_(torch.maximum(low.abs(), high.abs()).clamp_min(1e-8))

    def train_quantize(self, x: torch.Tensor) -> torch.Tensor:
        bits = self.bits_for(x)
        upper = self._rows_param(self.upper_bound).abs().clamp_min(1e-8)
        step = upper / (2 ** (bits - 1) - 1)
        clipped = BoundClip.apply(self.view(x), -upper, upper)
        return (round_ste(clipped / step) * step).reshape(x.shape)


class LSQQuantizer(Quantizer):
    """LSQ: a learnable step with gradient scale 1/sqrt(n * Qp), n the elements per step (Esser et al.).

    Signed tensors use [-2^(b-1), 2^(b-1)-1], unsigned ones [0, 2^b - 1].
    """

    def __init__(self, bits: int, signed: bool = True, rows: int = 1, one_sided: bool = False) -> None:
        super().__init__(bits, rows, one_sided)
        self.signed = signed
        self.step = nn.Parameter(torch.ones(_param_shape(rows)))

    def qrange(self) -> tuple[int, int]:
        """Integer range (Qn, Qp) of the grid."""
        return lsq_range(self.bits, self.signed)  # type: ignore[return-value]

    def grid(self, x: torch.Tensor | None = None) -> Grid:
        if self.bits_override is not None:
            raise SrquantError("LSQ quantizers take one bit-width; per-sample bits need a multi-bit quantizer")
        return lsq_grid(self._rows_param(self.step.detach()), self.bits, self.signed, self.rows)

    def _step_for(self, lower: torch.Tensor, upper: torch.Tensor, bits: int) -> torch.Tensor:
        qn, qp = lsq_range(bits, self.signed)
        lower, upper = torch.as_tensor(lower), torch.as_tensor(upper)
        if not self.signed:  # an unsigned grid cannot hold negative values: the upper end alone sets the step
            return (upper.clamp_min(0) / qp).clamp_min(1e-8)
        return torch.maximum(upper.abs() / qp, lower.abs() / -qn).clamp_min(1e-8)

    def grid_for(self, lower: torch.Tensor, upper: torch.Tensor, bits: int | None = None) -> Grid:
        return lsq_grid(self._step_for(lower, upper, bits or self.bits), bits or self.bits, self.signed)

    def set_range(self, lower: torch.Tensor | float, upper: torch.Tensor | float) -> None:
        low, high = self._as_param(lower, self.step), self._as_param(upper, self.step)
        self._check_finite(low, high)
        with torch.no_grad():
            self.step.copy_(self._step_for(low, high, self.bits))

    def init_lsq(self, mean_abs: torch.Tensor | float) -> None:
        """LSQ's initial step 2 mean|x| / sqrt(Qp), from the mean magnitude of the tensor (per row)."""
        _, qp = self.qrange()
        value = self._as_param(mean_abs, self.step)
        with torch.no_grad():
            self.step.copy_((2 * value / math.sqrt(qp)).clamp_min(1e-8))

    def train_quantize(self, x: torch.Tensor) -> torch.Tensor:
        qn, qp = self.qrange()
        per_step = x.numel() // self.rows
        scale = 1.0 / math.sqrt(per_step * qp)
        step = self._rows_param(self.step).abs().clamp_min(1e-8)  # the grid's step (`lsq_grid`), with gradient
        step = step * scale + (step - step * scale).detach()  # value: step; gradient: scaled
        return (round_ste(torch.clamp(self.view(x) / step, qn, qp)) * step).reshape(x.shape)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", signed" if self.signed else ", unsigned")


class MultiBitLSQ(Quantizer):
    """One LSQ activation quantizer per candidate bit; each sample is quantized only by its selected bit's one.

    `select(bits, gate, alternatives)` sets the per-sample bits (B,) and, for training, the straight-through
    one-hot gate (B, n) over a controller's codes with the bit each code leads to (B, n): the output is then
    sum_k gate_k * Q_{alternatives_k}(x), exactly the selected Q forward. Without a selection the widest
    candidate is used (that is also its `grid()`). The candidates always share this quantizer's mode.
    """

    def __init__(self, bits: Sequence[int], signed: bool = True) -> None:
        super().__init__(max(bits))
        self.candidate_bits = tuple(sorted(int(b) for b in bits))
        self.candidates = nn.ModuleDict({str(b): LSQQuantizer(b, signed=signed) for b in self.candidate_bits})
        self.sample_bits: torch.Tensor | None = None
        self.gate: torch.Tensor | None = None
        self.alternatives: torch.Tensor | None = None

    @property
    def mode(self) -> QuantMode:  # type: ignore[override]
        """The mode of this quantizer and of every candidate."""
        return self._mode

    @mode.setter
    def mode(self, value: QuantMode) -> None:
        self._mode = value
        for candidate in (self._modules.get("candidates") or {}).values():  # type: ignore[union-attr]
            candidate.mode = value

    def _candidate(self, bits: int) -> LSQQuantizer:
        return self.candidates[str(bits)]  # type: ignore[return-value]

    @property
    def signed(self) -> bool:
        """Whether the candidates use a signed grid (set at calibration)."""
        return self._candidate(self.bits).signed

    def set_signed(self, signed: bool) -> None:
        """Switch every candidate between signed and unsigned grids."""
        for b in self.candidate_bits:
            self._candidate(b).signed = signed

    def init_lsq(self, mean_abs: float) -> None:
        """LSQ's initial step for every candidate, from the calibration mean |x|."""
        for b in self.candidate_bits:
            self._candidate(b).init_lsq(mean_abs)

    def grid(self, x: torch.Tensor | None = None) -> Grid:
        return self._candidate(self.bits).grid()

    def grid_for(self, lower: torch.Tensor, upper: torch.Tensor, bits: int | None = None) -> Grid:
        return self._candidate(self.bits).grid_for(lower, upper, bits)

    def set_range(self, lower: torch.Tensor | float, upper: torch.Tensor | float) -> None:
        for b in self.candidate_bits:
            self._candidate(b).set_range(lower, upper)

    def train_quantize(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantize(x)

    def select(
        self, bits: torch.Tensor | None, gate: torch.Tensor | None = None, alternatives: torch.Tensor | None = None
    ) -> None:
        """Set the per-sample bits (and, in training, the one-hot gate with each code's bit) for the next passes."""
        if gate is not None and (alternatives is None or gate.shape != alternatives.shape):
            raise SrquantError("a multi-bit gate needs the bit of every code: alternatives of the gate's shape")
        self.sample_bits = bits
        self.gate = gate
        self.alternatives = alternatives

    def _expand(self, values: torch.Tensor, n: int) -> torch.Tensor:
        """Per-sample values repeated for inputs whose leading dim is batch-major (e.g. windows per image)."""
        if values.shape[0] == n:
            return values
        if n % values.shape[0]:
            raise SrquantError(f"input batch {n} is not a multiple of the {values.shape[0]} selected bits")
        return values.repeat_interleave(n // values.shape[0])

    def _check(self, bits: torch.Tensor) -> list[int]:
        present = torch.unique(bits).tolist()
        unknown = [b for b in present if b not in self.candidate_bits]
        if unknown:
            raise SrquantError(f"bit {unknown[0]} is not a candidate of this quantizer {self.candidate_bits}")
        return present

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.sample_bits is None:
            return self._candidate(self.bits)(x)
        if self.gate is not None and self.alternatives is not None:
            return self._mixture(x)
        bits = self._expand(self.sample_bits, x.shape[0])
        present = self._check(bits)
        if len(present) == 1:
            return self._candidate(present[0])(x)
        out = x.new_zeros(x.shape)
        for b in present:
            idx = (bits == b).nonzero(as_tuple=True)[0]
            out = out.index_put((idx,), self._candidate(b)(x[idx]))
        return out

    def _mixture(self, x: torch.Tensor) -> torch.Tensor:
        """Training: sum over codes of gate_k * Q_{bit of k}(x); forward value is the selected Q exactly."""
        assert self.gate is not None and self.alternatives is not None
        n = x.shape[0]
        gate = torch.stack([self._expand(self.gate[:, k], n) for k in range(self.gate.shape[1])], dim=1)
        alternatives = torch.stack(
            [self._expand(self.alternatives[:, k], n) for k in range(self.alternatives.shape[1])], dim=1
        )
        shape = (-1, *[1] * (x.dim() - 1))
        out = x.new_zeros(x.shape)
        for b in self._check(alternatives):
            weight = (gate * (alternatives == b)).sum(dim=1)  # 1 for the selected bit's samples, else 0
            out = out + weight.view(shape) * self._candidate(b)(x)
        return out

    def extra_repr(self) -> str:
        return f"bits={self.candidate_bits}, mode={self.mode.value}, {'signed' if self.signed else 'unsigned'}"
