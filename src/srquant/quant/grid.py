"""The integer grid of a quantizer: value = scale * (code - zero_point), code an integer in [qmin, qmax].

Every quantizer describes itself by a `Grid` (its `grid()`), and every consumer of quantization parameters
(checkpoint packing, ONNX export, accounting, calibrators) goes through it: no other code derives a step size
from bounds. A grid may hold one set of parameters (per tensor), one per row of the tensor's first dimension
(`rows` > 1: per output channel, or per slice of a fused weight), one per part of an activation's channels
(`rows` > 1 with `axis` 1: the equal channel parts of a concatenation), or, for activations of dynamic methods,
one per sample (tensors that broadcast against the input).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IntOrTensor = int | torch.Tensor


@dataclass(frozen=True)
class Grid:
    """A uniform integer grid; tensors broadcast against `view(x)`.

    `scale` and `zero_point` are float tensors (a zero point may be fractional: 2DQuant's two-bound grids need
    not contain 0); `qmin`/`qmax` are the integer code range; `rows` > 1 means the parameters hold one value per
    slice of dimension `axis`: of dimension 0 (shape (rows, 1) against the (rows, -1) view), or of an
    activation's channel dimension 1 (shape (1, rows, 1) against the (batch, rows, -1) view).
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    qmin: IntOrTensor
    qmax: IntOrTensor
    bits: IntOrTensor
    rows: int = 1
    axis: int = 0

    def view(self, x: torch.Tensor) -> torch.Tensor:
        """The tensor as the grid's parameters see it: (rows, -1) or (batch, rows, -1) for per-row grids,
        unchanged otherwise."""
        return rows_view(x, self.rows, self.axis)

    def _limits(self, like: torch.Tensor) -> tuple[IntOrTensor, IntOrTensor]:
        """(qmin, qmax) as clamp takes them: both numbers, or both tensors (per-sample bits)."""
        if isinstance(self.qmin, torch.Tensor) or isinstance(self.qmax, torch.Tensor):
            kind = {"dtype": like.dtype, "device": like.device}
            return torch.as_tensor(self.qmin, **kind), torch.as_tensor(self.qmax, **kind)
        return self.qmin, self.qmax

    def codes_of(self, values: torch.Tensor) -> torch.Tensor:
        """Integer codes (as floats) of values already in the grid's view; broadcasting is elementwise."""
        codes = torch.round(values / self.scale + self.zero_point)
        return torch.clamp(codes, *self._limits(codes))

    def values_of(self, codes: torch.Tensor) -> torch.Tensor:
        """Values of codes already in the grid's view."""
        return (codes - self.zero_point) * self.scale

    def to_codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes of x (float dtype, x's shape)."""
        return self.codes_of(self.view(x)).reshape(x.shape)

    def from_codes(self, codes: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """Values of codes, reshaped to `shape` (the quantized tensor's)."""
        flat = rows_view(codes.reshape(shape), self.rows, self.axis)
        return self.values_of(flat.to(self.scale.dtype)).reshape(shape)

    @torch.no_grad()
    def fake(self, x: torch.Tensor) -> torch.Tensor:
        """x rounded onto the grid (no gradient): from_codes(to_codes(x)), computed with few temporaries."""
        out = (self.view(x) / self.scale).add_(self.zero_point).round_()
        out = torch.clamp(out, *self._limits(out))
        return out.sub_(self.zero_point).mul_(self.scale).reshape(x.shape)

    def per_channel(self, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero_point) with one entry per slice of dimension 0 of a tensor with `channels` slices."""
        if self.axis != 0:
            raise ValueError("per-part activation grids have no per-output-channel form")
        if self.rows > 1 and channels % self.rows:
            raise ValueError(f"a grid of {self.rows} rows does not divide {channels} channels")
        scale, zero = self.scale.detach().reshape(-1), self.zero_point.detach().reshape(-1)
        repeat = channels // scale.numel()
        return scale.repeat_interleave(repeat), zero.repeat_interleave(repeat)

    def integer_zero_point(self) -> bool:
        """True when every zero point is an integer (what uint8/int8 kernels need)."""
        return bool(torch.equal(self.zero_point, torch.round(self.zero_point)))


def rows_view(x: torch.Tensor, rows: int, axis: int = 0) -> torch.Tensor:
    """x as per-row parameters see it when there are several rows: (rows, -1) for rows along dimension 0,
    (batch, rows, -1) for rows along the channels (axis 1); unchanged otherwise."""
    if rows == 1:
        return x
    return x.reshape(rows, -1) if axis == 0 else x.reshape(x.shape[0], rows, -1)


def rows_of(x: torch.Tensor, rows: int, axis: int = 0) -> torch.Tensor:
    """x as (rows, -1): every value of one row (one grid) in one line, whichever axis the rows run along."""
    if axis == 0 or rows == 1:
        return x.reshape(rows, -1)
    return x.reshape(x.shape[0], rows, -1).transpose(0, 1).reshape(rows, -1)


def asymmetric_grid(
    lower: torch.Tensor, upper: torch.Tensor, bits: IntOrTensor, align_zero: bool = False, rows: int = 1, axis: int = 0
) -> Grid:
    """2DQuant's two-bound grid: step (u - l) / (2^b - 1) from l; with `align_zero` the zero point is rounded to an
    integer (the range shifts by less than half a step), as uint8 kernels need."""
    levels = 2**bits - 1
    scale = (upper - lower).clamp_min(1e-8) / levels
    zero = -lower / scale
    if align_zero:
        zero = torch.round(torch.clamp(zero, 0, levels))
    return Grid(scale, zero, 0, levels, bits, rows, axis)


def symmetric_grid(bound: torch.Tensor, bits: IntOrTensor, rows: int = 1) -> Grid:
    """A symmetric grid on [-u, u] with 2^(b-1) - 1 steps per side (zero exact, the int8 kernels' weights)."""
    half = 2 ** (bits - 1) - 1
    scale = bound.abs().clamp_min(1e-8) / half
    return Grid(scale, torch.zeros_like(scale), -half, half, bits, rows)


def lsq_grid(step: torch.Tensor, bits: IntOrTensor, signed: bool, rows: int = 1) -> Grid:
    """LSQ's grid: step * [-2^(b-1), 2^(b-1) - 1] (signed) or step * [0, 2^b - 1] (unsigned)."""
    scale = step.abs().clamp_min(1e-8)
    qmin, qmax = lsq_range(bits, signed)
    return Grid(scale, torch.zeros_like(scale), qmin, qmax, bits, rows)


def lsq_range(bits: IntOrTensor, signed: bool) -> tuple[IntOrTensor, IntOrTensor]:
    """(Qn, Qp) of an LSQ grid."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1
