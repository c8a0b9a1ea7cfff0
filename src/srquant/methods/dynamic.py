"""Dynamic-bit methods after quantization: save and restore their bit state, and measure bits per image.

A dynamic method (AdaBM) keeps its bit controller outside the architecture. The quantized checkpoint holds
its state as an opaque `dynamic` record; `restore_dynamic` rebuilds the controller and attaches it, and
`per_image_metrics` gives the FAB and BitOPs of each image at the bits it actually got.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from srquant.errors import SrquantError
from srquant.methods.adabm import BitController, accounting_bits, attach_controller, bit_report
from srquant.metrics.complexity import GIGA, bitops
from srquant.quant.accounting import ops_report


def dynamic_state(controller: BitController) -> dict[str, Any]:
    """The checkpoint record of an AdaBM bit controller."""
    return {"method": "adabm", "state": controller.state_dict()}


def restore_dynamic(model: nn.Module, record: dict[str, Any]) -> BitController | None:
    """Rebuild and attach the bit controller a checkpoint holds (None for fixed-bit models)."""
    dynamic = record.get("dynamic")
    if not dynamic:
        return None
    if dynamic.get("method") != "adabm":
        raise SrquantError(f"unknown dynamic method {dynamic.get('method')!r} in the checkpoint")
    state = dynamic["state"]
    extra = state["_extra_state"]
    controller = BitController(extra["layer_names"], int(extra["base_bits"]))
    controller.load_state_dict(state, strict=True)
    attach_controller(model, controller)
    return controller


def per_image_metrics(
    model: nn.Module, controller: BitController, scale: int, bit_log: dict[str, dict[str, Any]] | None = None
) -> Callable[[str, torch.Tensor], dict[str, float]]:
    """FAB and BitOPs (G, for a 1280x720 output at the bits this image gets) of one LR image.

    With `bit_log`, each image's per-layer bits are also recorded there under the image name.
    """
    report = ops_report(model, scale)

    def measure(name: str, lr: torch.Tensor) -> dict[str, float]:
        bits = accounting_bits(model, controller, lr)
        used = bit_report(controller, lr)
        if bit_log is not None:
            bit_log[name] = {"fab": used.fab, "layers": {k: v[0] for k, v in used.per_layer.items()}}
        return {"fab": used.fab, "bitops_g": bitops(report, bits) / GIGA}

    return measure
