"""srquant: quantize super-resolution networks and measure, honestly, what it costs.

The Python API mirrors the CLI: `load_model`, `upscale_image`, `evaluate`, `write_lr_set`.
"""

from srquant.api import evaluate, load_model, upscale, upscale_file, upscale_image, write_lr_set
from srquant.errors import SrquantError

__version__ = "0.1.0"

__all__ = [
    "SrquantError",
    "evaluate",
    "load_model",
    "upscale",
    "upscale_file",
    "upscale_image",
    "write_lr_set",
]
