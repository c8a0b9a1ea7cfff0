"""Fake quantizers shared by every method: asymmetric two-bound (2DQuant), symmetric (AdaBM weights), LSQ.

Each quantizer is an `nn.Module` with a mode: `FP` passes tensors through, `CALIBRATE` shows them to an
attached calibrator and passes them through (statistics are collected with quantization off), `QUANT`
fake-quantizes. The bit-width is an int, or a per-sample tensor set by dynamic methods (`bits_override`).
"""

from __future__ import annotations

import enum
import math
from typing import Protocol

import torch
from torch import nn


class QuantMode(enum.Enum):
    """What a quantizer does with its input."""

    FP = "fp"
    CALIBRATE = "calibrate"
    QUANT = "quant"


class Calibrator(Protocol):
    """Collects statistics of the tensors a quantizer sees and proposes its bounds."""

    def collect(self, x: torch.Tensor) -> None: ...


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity gradient in the backward pass (straight-through estimator).

    Without autograd it is a plain round, so inference values are exactly integer grid points (the
    `x + (round(x) - x)` form can be one ulp off, which would break bit-identical reloading).
    """
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


def levels_for(bits: int | torch.Tensor) -> int | torch.Tensor:
    """Number of steps of a b-bit grid: 2^b - 1."""
    return (2**bits) - 1


def fake_quant_asymmetric(
    x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, bits: int | torch.Tensor
) -> torch.Tensor:
    """2DQuant's quantizer: s = (u-l)/(2^b-1), q = s*round((clip(x,l,u)-l)/s) + l.

    Rounding is straight-through; the bounds get gradients through the clip, through s and through +l.
    """
    step = (upper - lower).clamp_min(1e-8) / levels_for(bits)
    if not torch.is_grad_enabled():  # inference: the same operations in place, far less memory traffic
        out = torch.minimum(torch.maximum(x, lower), upper)
        return out.sub_(lower).div_(step).round_().mul_(step).add_(lower)
    clipped = BoundClip.apply(x, lower, upper)
    return round_ste((clipped - lower) / step) * step + lower


def zero_aligned(
    lower: torch.Tensor, upper: torch.Tensor, bits: int | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift [lower, upper] by less than half a step so that 0 is a grid point (an integer zero point).

    uint8 kernels (onnxruntime's QLinearConv) store x as round(x / s) + z with an integer z; a grid aligned
    this way is exactly representable, so the integer model computes what the fake-quant model computes.
    """
    levels = levels_for(bits)
    step = (upper - lower).clamp_min(1e-8) / levels
    zero = round_ste(torch.clamp(-lower / step, 0, levels))
    aligned = -zero * step
    return aligned, aligned + levels * step


class Quantizer(nn.Module):
    """Base class: mode handling, calibration hand-off, and an optional per-sample bit override."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        if not 1 <= bits <= 16:
            raise ValueError(f"bit-width must be in [1, 16], got {bits}")
        self.bits = bits
        self.mode = QuantMode.FP
        self.calibrator: Calibrator | None = None
        self.bits_override: torch.Tensor | None = None

    def effective_bits(self) -> int | torch.Tensor:
        """The per-sample bit tensor when a dynamic method set one, else the fixed bit-width."""
        return self.bits if self.bits_override is None else self.bits_override

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode is QuantMode.FP:
            return x
        if self.mode is QuantMode.CALIBRATE:
            if self.calibrator is not None:
                self.calibrator.collect(x.detach())
            return x
        return self.quantize(x)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"bits={self.bits}, mode={self.mode.value}"


class AsymmetricQuantizer(Quantizer):
    """Uniform asymmetric quantizer with two learnable bounds (per tensor), used for weights and activations.

    `one_sided` marks tensors with an exponential-like distribution (post-softmax, post-GELU): DOBI then
    keeps the lower bound at the minimum and searches only the upper one. `groups` > 1 gives each slice of
    the first dimension its own bounds (a fused qkv weight quantized as separate q, k and v weights).
    """

    def __init__(self, bits: int, one_sided: bool = False, groups: int = 1, align_zero: bool = False) -> None:
        super().__init__(bits)
        self.one_sided = one_sided
        self.groups = groups
        self.align_zero = align_zero  # snap the grid to an integer zero point (for integer export)
        shape = (groups,) if groups > 1 else ()
        self.lower_bound = nn.Parameter(torch.zeros(shape))
        self.upper_bound = nn.Parameter(torch.ones(shape))

    def grouped(self, x: torch.Tensor) -> torch.Tensor:
        """View a tensor as (groups, -1) so per-group bounds broadcast; per-tensor quantizers keep it as is."""
        return x.reshape(self.groups, -1) if self.groups > 1 else x

    def _bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.groups > 1:
            return self.lower_bound.view(-1, 1), self.upper_bound.view(-1, 1)
        return self.lower_bound, self.upper_bound

    def set_bounds(self, lower: float | torch.Tensor, upper: float | torch.Tensor) -> None:
        """Overwrite both bounds (used by calibrators); refuses non-finite or empty ranges."""
        lower_t = torch.as_tensor(lower, dtype=self.lower_bound.dtype).reshape(self.lower_bound.shape)
        upper_t = torch.as_tensor(upper, dtype=self.upper_bound.dtype).reshape(self.upper_bound.shape)
        if not (torch.isfinite(lower_t).all() and torch.isfinite(upper_t).all()):
            raise FloatingPointError(f"non-finite bounds ({lower_t.tolist()}, {upper_t.tolist()})")
        if (upper_t <= lower_t).any():
            upper_t = torch.maximum(upper_t, lower_t + 1e-6)
        with torch.no_grad():
            self.lower_bound.copy_(lower_t)
            self.upper_bound.copy_(upper_t)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        lower, upper = self._bounds()
        if self.align_zero:
            lower, upper = zero_aligned(lower, upper, self.effective_bits())
        return fake_quant_asymmetric(self.grouped(x), lower, upper, self.effective_bits()).reshape(x.shape)

    def extra_repr(self) -> str:
        extras = (", one_sided" if self.one_sided else "") + (f", groups={self.groups}" if self.groups > 1 else "")
        extras += ", align_zero" if self.align_zero else ""
        return super().extra_repr() + extras


class SymmetricQuantizer(Quantizer):
    """Symmetric quantizer on [-u, u] with one learnable bound u (AdaBM's weight quantizer).

    The grid has 2^b - 1 levels centred on zero (zero is exact); clipping follows the same bound rule.
    """

    def __init__(self, bits: int) -> None:
        super().__init__(bits)
        self.upper_bound = nn.Parameter(torch.tensor(1.0))

    def set_bounds(self, lower: float | torch.Tensor, upper: float | torch.Tensor) -> None:
        """Set u from a proposed range (the larger magnitude of the two bounds)."""
        bound = torch.maximum(torch.as_tensor(lower).abs(), torch.as_tensor(upper).abs()).clamp_min(1e-8)
        if not torch.isfinite(bound).all():
            raise FloatingPointError("non-finite symmetric bound")
        with torch.no_grad():
            self.upper_bound.copy_(bound.reshape(self.upper_bound.shape))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        bits = self.effective_bits()
        half = (2 ** (bits - 1)) - 1
        upper = self.upper_bound.abs().clamp_min(1e-8)
        step = upper / half
        clipped = BoundClip.apply(x, -upper, upper)
        return round_ste(clipped / step) * step


class LSQQuantizer(Quantizer):
    """LSQ: a learnable step size with gradient scale 1/sqrt(numel * Qp) (Esser et al.; Granular-DQ).

    Signed tensors use [-2^(b-1), 2^(b-1)-1], unsigned ones [0, 2^b - 1]; `init_from` sets the step to
    2 mean|x| / sqrt(Qp) as LSQ prescribes.
    """

    def __init__(self, bits: int, signed: bool = True) -> None:
        super().__init__(bits)
        self.signed = signed
        self.step = nn.Parameter(torch.tensor(1.0))

    def qrange(self) -> tuple[int, int]:
        """Integer range (Qn, Qp) of the grid."""
        if self.signed:
            return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        return 0, 2**self.bits - 1

    def init_from(self, x: torch.Tensor) -> None:
        """LSQ's initial step from a sample tensor."""
        _, qp = self.qrange()
        with torch.no_grad():
            self.step.copy_((2 * x.abs().mean() / math.sqrt(qp)).clamp_min(1e-8))

    def set_range(self, lower: torch.Tensor, upper: torch.Tensor) -> None:
        """Step that makes the grid span the observed range (a range-based alternative to `init_from`)."""
        qn, qp = self.qrange()
        span = torch.maximum(torch.as_tensor(upper).abs().max() / qp, torch.as_tensor(lower).abs().max() / max(-qn, 1))
        with torch.no_grad():
            self.step.copy_(span.clamp_min(1e-8))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        qn, qp = self.qrange()
        scale = 1.0 / math.sqrt(x.numel() * qp)
        step = self.step * scale + (self.step - self.step * scale).detach()  # value: step; gradient: scaled
        return round_ste(torch.clamp(x / step, qn, qp)) * step

    def extra_repr(self) -> str:
        return super().extra_repr() + (", signed" if self.signed else ", unsigned")
