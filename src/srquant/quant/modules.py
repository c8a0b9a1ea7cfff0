"""Quantized Conv2d / Linear: subclasses of the float modules that keep their parameter names.

A module is converted in place by switching its class to a quantized subclass of its own class and adding
an `input_quantizer` and a `weight_quantizer`. Because the subclass is built from the module's own class,
Conv2d subclasses with a custom `forward` (ESWT's shift conv) keep their behaviour: quantization hooks into
`_conv_forward`, which every Conv2d forward ends in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from srquant.quant.quantizers import Quantizer


class QuantizedModule:
    """Marker mixin: the module fake-quantizes its input and weight (and its output when it has one)."""

    input_quantizer: Quantizer
    weight_quantizer: Quantizer

    def _quantize_output(self, out: torch.Tensor) -> torch.Tensor:
        """Apply the optional `output_quantizer` (integer-kernel outputs); absent means float outputs."""
        quantizer = self._modules.get("output_quantizer")  # type: ignore[attr-defined]
        return out if quantizer is None else quantizer(out)


class QuantConvMixin(QuantizedModule):
    """Quantize the input and the weight right where the convolution runs."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = super()._conv_forward(self.input_quantizer(input), self.weight_quantizer(weight), bias)  # type: ignore[misc]
        return self._quantize_output(out)


class QuantLinearMixin(QuantizedModule):
    """Quantize the input and the weight of a linear layer."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out = F.linear(self.input_quantizer(input), self.weight_quantizer(self.weight), self.bias)  # type: ignore[attr-defined]
        return self._quantize_output(out)


class QuantConv2d(QuantConvMixin, nn.Conv2d):
    """Quantized nn.Conv2d."""


class QuantLinear(QuantLinearMixin, nn.Linear):
    """Quantized nn.Linear."""


_CLASS_CACHE: dict[type, type] = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}


def quantized_class(cls: type[nn.Module]) -> type[nn.Module]:
    """The quantized subclass for a float Conv2d/Linear class (built once per class for subclasses)."""
    if cls in _CLASS_CACHE:
        return _CLASS_CACHE[cls]
    if issubclass(cls, nn.Conv2d):
        mixin: type = QuantConvMixin
    elif issubclass(cls, nn.Linear):
        mixin = QuantLinearMixin
    else:
        raise TypeError(f"cannot quantize {cls.__name__}: only Conv2d and Linear (and their subclasses)")
    made = type(f"Quant{cls.__name__}", (mixin, cls), {"__module__": __name__, "__doc__": f"Quantized {cls.__name__}."})
    _CLASS_CACHE[cls] = made
    return made


def convert_module(module: nn.Module, input_quantizer: Quantizer, weight_quantizer: Quantizer) -> nn.Module:
    """Turn a float Conv2d/Linear into its quantized subclass in place; parameters are untouched."""
    if isinstance(module, QuantizedModule):
        raise ValueError(f"{type(module).__name__} is already quantized")
    module.__class__ = quantized_class(type(module))
    module.input_quantizer = input_quantizer
    module.weight_quantizer = weight_quantizer
    return module


def is_quantized(module: nn.Module) -> bool:
    """True for modules converted by `convert_module`."""
    return isinstance(module, QuantizedModule)
