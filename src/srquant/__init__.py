"""srquant: quantize super-resolution networks and measure, honestly, what it costs.

The Python API mirrors the CLI: `load_model`, `quantize`, `save_quantized` / `load_quantized`,
`upscale_image`, `evaluate`, `write_lr_set`.
"""

from srquant.api import evaluate, load_model, quantize, upscale, upscale_file, upscale_image, write_lr_set
from srquant.errors import SrquantError
from srquant.quant.checkpoint import load_quantized, save_quantized

__version__ = "0.1.0"

__all__ = [
    "SrquantError",
    "evaluate",
    "load_model",
    "load_quantized",
    "quantize",
    "save_quantized",
    "upscale",
    "upscale_file",
    "upscale_image",
    "write_lr_set",
]
