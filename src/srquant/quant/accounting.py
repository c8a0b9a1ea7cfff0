"""Cost of a quantized model from the bits its quantizers actually use: size, BitOPs and 2DQuant's Ops.

Ops are MACs for an LR input whose output is 1280x720 (the CADyQ / Granular-DQ convention); sizes are
decimal MB (10^6 bytes). See `srquant.metrics.complexity` for how rows are counted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from srquant.metrics.complexity import (
    GIGA,
    HOOK_NAMES,
    OpsReport,
    bitops,
    count_ops,
    lr_size_for_output,
    ops_at_bits,
    param_bytes,
    to_mb,
)
from srquant.quant.modules import is_quantized
from srquant.quant.quantize import fp_mode
from srquant.quant.quantizers import Quantizer, QuantMode

FULL = 32


def _active(q: object) -> bool:
    return isinstance(q, Quantizer) and q.mode is QuantMode.QUANT


def layer_bits(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(weight bits, activation bits) of every quantized layer and attention matmul that is switched on."""
    bits: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        if is_quantized(module):
            w = module.weight_quantizer.bits if _active(module.weight_quantizer) else FULL
            a = module.input_quantizer.bits if _active(module.input_quantizer) else FULL
            if (w, a) != (FULL, FULL):
                bits[name] = (w, a)
        hooks = [getattr(module, h, None) for h in HOOK_NAMES]
        if any(_active(h) for h in hooks):
            a = min(h.bits for h in hooks if _active(h))
            bits[f"{name}.matmul" if name else "matmul"] = (a, a)
    return bits


@dataclass(frozen=True)
class Cost:
    """Size and ops of a model at the bits it runs with, next to its float cost."""

    size_mb: float
    fp_size_mb: float
    bitops_g: float
    ops_g: float
    fp_ops_g: float
    lr_size: tuple[int, int]

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def ops_report(model: nn.Module, scale: int, lr_size: tuple[int, int] | None = None) -> OpsReport:
    """Per-module MACs of the float computation (quantizers off) for a 1280x720 output by default."""
    with fp_mode(model):
        return count_ops(model, lr_size or lr_size_for_output(scale))


def model_cost(
    model: nn.Module, scale: int, lr_size: tuple[int, int] | None = None, report: OpsReport | None = None
) -> Cost:
    """Size (decimal MB), BitOPs and 2DQuant Ops (G MACs) of a model with its current quantizer settings."""
    report = report or ops_report(model, scale, lr_size)
    bits = layer_bits(model)
    weight_bits = {name: w for name, (w, _) in bits.items() if not name.endswith("matmul") and w < FULL}
    # 2DQuant's "Ops at N bits" uses one N per op; with W != A the larger one is the conservative choice.
    ops_bits = {name: max(w, a) for name, (w, a) in bits.items()}
    return Cost(
        size_mb=to_mb(param_bytes(model, weight_bits)),
        fp_size_mb=to_mb(param_bytes(model, {})),
        bitops_g=bitops(report, bits) / GIGA,
        ops_g=ops_at_bits(report, ops_bits) / GIGA,
        fp_ops_g=report.total_macs / GIGA,
        lr_size=report.lr_size,
    )
