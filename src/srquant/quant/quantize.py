"""`quantize_(model, spec, layout)`: convert selected layers in place; mode switches for calibration and FP.

The FP teacher used by distillation is the same network with quantization switched off (`fp_mode`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from srquant.errors import SrquantError
from srquant.models.layout import PER_CHANNEL
from srquant.quant.modules import convert_module, is_quantized
from srquant.quant.quantizers import (
    AsymmetricQuantizer,
    LSQQuantizer,
    Quantizer,
    QuantMode,
    SymmetricQuantizer,
)
from srquant.quant.spec import QuantLayout, QuantSpec, matches

MATMUL_HOOKS = ("q_hook", "k_hook", "v_hook", "attn_hook")
GLUE_HOOK_SUFFIX = "_glue"  # leaf-name suffix of the nn.Identity taps architectures put between layers


@dataclass
class QuantReport:
    """Which modules `quantize_` converted, at which (w_bits, a_bits)."""

    layers: dict[str, tuple[int, int]] = field(default_factory=dict)
    matmul: dict[str, int] = field(default_factory=dict)
    glue: dict[str, int] = field(default_factory=dict)
    shared_inputs: dict[str, str] = field(default_factory=dict)  # layer -> glue hook whose grid it reads with
    input_parts: dict[str, int] = field(default_factory=dict)  # layer -> grids of its concatenated input

    def summary(self) -> str:
        """One line: counts per bit setting."""
        counts: dict[tuple[int, int], int] = {}
        for bits in self.layers.values():
            counts[bits] = counts.get(bits, 0) + 1
        parts = [f"{n} layers at W{w}A{a}" for (w, a), n in sorted(counts.items())]
        if self.matmul:
            parts.append(f"{len(self.matmul)} matmul operands")
        if self.glue:
            parts.append(f"{len(self.glue)} glue tensors")
        if self.input_parts:
            parts.append(f"{len(self.input_parts)} inputs on per-part grids")
        return ", ".join(parts) or "nothing quantized"


def _weight_quantizer(kind: str, bits: int, rows: int) -> Quantizer:
    if kind == "symmetric":
        return SymmetricQuantizer(bits, rows)
    if kind == "lsq":
        return LSQQuantizer(bits, signed=True, rows=rows)
    return AsymmetricQuantizer(bits, rows)


def _act_quantizer(kind: str, bits: int, one_sided: bool, align_zero: bool = False, parts: int = 1) -> Quantizer:
    if kind == "lsq":
        return LSQQuantizer(bits, signed=not one_sided, one_sided=one_sided)
    return AsymmetricQuantizer(bits, rows=parts, one_sided=one_sided, align_zero=align_zero, axis=int(parts > 1))


def weight_rows(module: nn.Conv2d | nn.Linear, spec: QuantSpec, layout: QuantLayout, name: str) -> int:
    """How many grids a layer's weight gets: one per output channel, or one (one per slice of a fused weight)."""
    if spec.weight_granularity == "channel":
        return int(module.weight.shape[0])
    return next((g for pattern, g in layout.weight_groups if matches(name, (pattern,))), 1)


def input_parts(module: nn.Conv2d | nn.Linear, spec: QuantSpec, layout: QuantLayout, name: str) -> int:
    """How many grids a layer's input gets: one per concatenated part the layout lists, or per input channel
    where it lists `PER_CHANNEL` (with `act_granularity` 'part'), or one."""
    if spec.act_granularity != "part":
        return 1
    parts = next((p for pattern, p in layout.input_parts if matches(name, (pattern,))), 1)
    if parts == PER_CHANNEL:
        if not isinstance(module, nn.Conv2d):
            raise SrquantError(f"{name}: per-channel input grids need a conv")
        parts = module.in_channels
    if parts > 1 and (not isinstance(module, nn.Conv2d) or module.in_channels % parts):
        raise SrquantError(f"{name}: input_parts {parts} needs a conv whose input channels it divides")
    return parts


def _set_child(model: nn.Module, dotted: str, child: nn.Module) -> None:
    parent_name, _, leaf = dotted.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, child)


def quantize_(model: nn.Module, spec: QuantSpec, layout: QuantLayout) -> QuantReport:
    """Replace the layers the spec selects with quantized versions, in place; quantizers start in FP mode.

    Every quantizer starts disabled (FP mode) so the converted model still equals the float one until a
    method calibrates it and switches quantization on.
    """
    body = spec.layers if spec.layers is not None else layout.body
    eight = spec.fixed_8bit if spec.fixed_8bit is not None else (layout.fixed_8bit if spec.full else ())
    report = QuantReport()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Conv2d | nn.Linear) or is_quantized(module):
            continue
        if matches(name, layout.never) or matches(name, spec.keep_fp):
            continue
        if matches(name, body):
            w_bits, a_bits = spec.w_bits, spec.a_bits
        elif matches(name, eight):
            w_bits, a_bits = spec.full_w_bits, 8
        else:
            continue
        one_sided = matches(name, layout.post_activation)
        parts = input_parts(module, spec, layout, name)
        device = module.weight.device
        convert_module(
            module,
            _act_quantizer(
                spec.act_quantizer,
                a_bits,
                one_sided,
                align_zero=spec.output_bits is not None,
                parts=parts,
            ).to(device),
            _weight_quantizer(spec.weight_quantizer, w_bits, weight_rows(module, spec, layout, name)).to(device),
        )
        if spec.output_bits is not None:
            module.output_quantizer = AsymmetricQuantizer(spec.output_bits, align_zero=True).to(device)
        report.layers[name] = (w_bits, a_bits)
        if parts > 1:
            report.input_parts[name] = parts
    if spec.matmul:
        for name, module in list(model.named_modules()):
            leaf = name.rpartition(".")[2]
            if leaf in MATMUL_HOOKS and isinstance(module, nn.Identity) and not matches(name, spec.keep_fp):
                aligned = spec.output_bits is not None  # integer kernels: the operands' zero points are integers
                quantizer = _act_quantizer(spec.act_quantizer, spec.a_bits, leaf == "attn_hook", align_zero=aligned)
                _set_child(model, name, quantizer.to(device))
                report.matmul[name] = spec.a_bits
    if spec.glue_bits is not None:
        for name, module in list(model.named_modules()):
            if name.endswith(GLUE_HOOK_SUFFIX) and isinstance(module, nn.Identity) and not matches(name, spec.keep_fp):
                _set_child(model, name, AsymmetricQuantizer(spec.glue_bits, align_zero=True).to(device))
                report.glue[name] = spec.glue_bits
        _share_glue_grids(model, layout, report)
    return report


def _share_glue_grids(model: nn.Module, layout: QuantLayout, report: QuantReport) -> None:
    """Give each layer that reads a slice of a quantized glue tensor, or another layer's output through ReLU /
    pixel shuffle, that tensor's quantizer as its input one (the layout's `glue_inputs`).

    The values are already on that grid, so the shared quantizer maps them to themselves: one rounding, not
    two, and the integer graph passes the uint8 tensor straight on. A hook may hold `{scale}` and
    `|`-separated alternatives; the first that names a glue tap or a quantized layer's output quantizer wins.
    """
    for name in report.layers:
        for pattern, hook in layout.glue_inputs:
            found = re.fullmatch(pattern, name)
            if found is None:
                continue
            for candidate in found.expand(hook).format(scale=getattr(model, "scale", 0)).split("|"):
                layer, _, leaf = candidate.rpartition(".")
                if candidate in report.glue or (leaf == "output_quantizer" and layer in report.layers):
                    model.get_submodule(name).input_quantizer = model.get_submodule(candidate)
                    report.shared_inputs[name] = candidate
                    break
            break


def quantizers(model: nn.Module, every_name: bool = False) -> Iterator[tuple[str, Quantizer]]:
    """Every quantizer in the model with its dotted name (not the parts of a multi-bit quantizer); a quantizer
    shared by two places (a glue tap that is also a layer's input quantizer) once, or under each name."""
    outer: list[str] = []
    for name, module in model.named_modules(remove_duplicate=not every_name):
        if isinstance(module, Quantizer) and not any(name.startswith(f"{o}.") for o in outer):
            outer.append(name)
            yield name, module


def set_mode(model: nn.Module, mode: QuantMode) -> None:
    """Put every quantizer of the model in one mode."""
    for _, quantizer in quantizers(model):
        quantizer.mode = mode


@contextmanager
def mode_scope(model: nn.Module, mode: QuantMode, chosen: Callable[[str], bool] | None = None) -> Iterator[nn.Module]:
    """Temporarily switch every quantizer (or those whose name `chosen` accepts) to `mode`, restoring each
    quantizer's own mode afterwards."""
    saved = [(q, q.mode) for _, q in quantizers(model)]
    for name, quantizer in quantizers(model):
        if chosen is None or chosen(name):
            quantizer.mode = mode
    try:
        yield model
    finally:
        for quantizer, mode_before in saved:
            quantizer.mode = mode_before


def fp_mode(model: nn.Module) -> AbstractContextManager[nn.Module]:
    """The FP teacher: the same network with all quantization switched off."""
    return mode_scope(model, QuantMode.FP)


def bound_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learnable quantizer parameters (bounds or steps, of multi-bit parts too), the only ones DQC trains."""
    return [p for _, q in quantizers(model) for p in q.parameters()]
