"""srquant: quantize super-resolution networks and measure, honestly, what it costs.

The Python API mirrors the CLI: `load_model`, `quantize`, `load_quantized`, `evaluate`, `evaluate_model`,
`upscale_image`, `upscale_file`, `write_lr_set`, `export_quantized`, `bench_speed`; methods are plugins
(`register_method`).
"""

from srquant.api import (
    bench_speed,
    evaluate,
    evaluate_model,
    export_quantized,
    load_model,
    load_quantized,
    open_model,
    quantize,
    upscale,
    upscale_file,
    upscale_image,
    write_lr_set,
)
from srquant.errors import SrquantError
from srquant.methods.base import Method
from srquant.methods.registry import get_method, method_names, register_method

__version__ = "0.2.0"

__all__ = [
    "Method",
    "SrquantError",
    "bench_speed",
    "evaluate",
    "evaluate_model",
    "export_quantized",
    "get_method",
    "load_model",
    "load_quantized",
    "method_names",
    "open_model",
    "quantize",
    "register_method",
    "upscale",
    "upscale_file",
    "upscale_image",
    "write_lr_set",
]
