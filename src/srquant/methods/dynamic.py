"""Dynamic-bit methods after quantization: save and restore their bit state, and measure bits per image.

A dynamic method (AdaBM, Granular-DQ) keeps its bit controller outside the architecture. The quantized
checkpoint holds its state as an opaque `dynamic` record. `prepare_dynamic` rebuilds the method's own
quantizer structure before `load_quantized` loads the state (Granular-DQ's multi-bit input quantizers);
`restore_dynamic` rebuilds the controller and attaches it; `load_dynamic` does all of it in one call.
`per_image_metrics` (AdaBM) and `PatchwiseRunner` (Granular-DQ) give the FAB and BitOPs of each image at
the bits it actually got; `eval_hooks` picks the right one for a controller.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from srquant.data.io import write_image
from srquant.errors import SrquantError
from srquant.methods.adabm import BitController, accounting_bits, attach_controller, bit_report
from srquant.methods.granular_dq import (
    GranularDQConfig,
    GranularDQResult,
    GranularityBitController,
    MultiBitLSQ,
    PatchBit,
    bit_map,
    image_bit_report,
    multibit_quantizers,
    upscale_patchwise,
)
from srquant.methods.granular_dq import attach_controller as attach_granular
from srquant.metrics.complexity import GIGA, bitops, lr_size_for_output
from srquant.quant.accounting import ops_report
from srquant.quant.checkpoint import load_quantized

DynamicController = BitController | GranularityBitController
GRANULAR = "granular-dq"


def dynamic_state(controller: BitController) -> dict[str, Any]:
    """The checkpoint record of an AdaBM bit controller."""
    return {"method": "adabm", "state": controller.state_dict()}


def granular_state(model: nn.Module, result: GranularDQResult) -> dict[str, Any]:
    """The checkpoint record of a Granular-DQ model: config, head conv, controller state, multi-bit quantizers."""
    layers = [
        {"name": name, "bits": list(q.candidate_bits), "signed": bool(q.signed)}
        for name, q in zip(result.controller.layer_names, multibit_quantizers(model, result.controller), strict=True)
    ]
    return {
        "method": GRANULAR,
        "config": dataclasses.asdict(result.config),
        "head": result.head,
        "layers": layers,
        "state": result.controller.state_dict(),
    }


def _method(record: dict[str, Any]) -> str | None:
    dynamic = record.get("dynamic")
    if not dynamic:
        return None
    method = dynamic.get("method")
    if method not in ("adabm", GRANULAR):
        raise SrquantError(f"unknown dynamic method {method!r} in the checkpoint")
    return method


def prepare_dynamic(model: nn.Module, record: dict[str, Any]) -> None:
    """`load_quantized`'s `prepare` step: rebuild Granular-DQ's multi-bit input quantizers (no-op otherwise)."""
    if _method(record) != GRANULAR:
        return
    for layer in record["dynamic"]["layers"]:
        module = model.get_submodule(layer["name"])
        if not hasattr(module, "input_quantizer"):
            raise SrquantError(f"Granular-DQ layer {layer['name']} of the checkpoint is not a quantized layer")
        module.input_quantizer = MultiBitLSQ([int(b) for b in layer["bits"]], signed=bool(layer["signed"]))


def _granular_config(saved: dict[str, Any]) -> GranularDQConfig:
    fields = {f.name for f in dataclasses.fields(GranularDQConfig)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in fields}
    return GranularDQConfig(**values)


def restore_dynamic(model: nn.Module, record: dict[str, Any]) -> DynamicController | None:
    """Rebuild and attach the bit controller a checkpoint holds (None for fixed-bit models).

    Returns a `BitController` (AdaBM) or a `GranularityBitController` (Granular-DQ, in eval mode: the model must
    have been loaded with `prepare=prepare_dynamic`).
    """
    method = _method(record)
    if method is None:
        return None
    dynamic = record["dynamic"]
    state = dynamic["state"]
    if method == "adabm":
        extra = state["_extra_state"]
        controller = BitController(extra["layer_names"], int(extra["base_bits"]))
        controller.load_state_dict(state, strict=True)
        attach_controller(model, controller)
        return controller
    names = [layer["name"] for layer in dynamic["layers"]]
    if not all(isinstance(getattr(model.get_submodule(n), "input_quantizer", None), MultiBitLSQ) for n in names):
        raise SrquantError("a Granular-DQ checkpoint must be loaded with load_quantized(path, prepare_dynamic)")
    head = dynamic["head"]
    granular = GranularityBitController(
        names, model.get_submodule(head).out_channels, _granular_config(dynamic["config"])
    )
    granular.load_state_dict(state, strict=True)
    granular.eval()
    attach_granular(model, granular, head)
    return granular


def load_dynamic(path: str | Path) -> tuple[nn.Module, dict[str, Any], DynamicController | None]:
    """Load any quantized checkpoint with its dynamic-bit state: (model in eval mode, record, controller or None)."""
    model, record = load_quantized(path, prepare_dynamic)
    return model, record, restore_dynamic(model, record)


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


class PatchwiseRunner:
    """Granular-DQ evaluation: `runner(lr)` super-resolves patch-wise; `runner.measure(name, lr)` reports that call.

    FAB is the mean patch bit. `bitops_g` is the BitOPs (G) of a 1280x720 output whose area is split between the
    bits in the proportions of this image's patch pixels (ops are linear in pixels, so this is the patches'
    BitOPs per LR pixel times the LR pixels of a 1280x720 output), comparable with the other methods' column.
    With `bit_log`, each image's patch boxes and bits (and its own BitOPs) are recorded under its name; with
    `bitmap_dir`, a bit-map PNG of each image is written there.
    """

    def __init__(
        self,
        model: nn.Module,
        controller: GranularityBitController,
        scale: int,
        patch: int = 96,
        step: int = 90,
        bit_log: dict[str, dict[str, Any]] | None = None,
        bitmap_dir: Path | None = None,
    ) -> None:
        self.model, self.controller, self.scale = model, controller, scale
        self.patch, self.step = patch, step
        self.bit_log, self.bitmap_dir = bit_log, bitmap_dir
        self.layers = controller.layer_names
        self.w_bits = int(model.get_submodule(self.layers[0]).weight_quantizer.bits)
        self.ref_pixels = math.prod(lr_size_for_output(scale))
        self._last: tuple[torch.Tensor, list[PatchBit]] | None = None

    def __call__(self, lr: torch.Tensor) -> torch.Tensor:
        sr, bits = upscale_patchwise(self.model, self.controller, lr, self.patch, self.step)
        self._last = (lr, bits)
        return sr

    def measure(self, name: str, lr: torch.Tensor) -> dict[str, float]:
        """FAB and BitOPs of the last call, which must have been on this very `lr` (nothing is run again)."""
        if self._last is None or self._last[0] is not lr:
            raise SrquantError("PatchwiseRunner.measure must follow the runner's own call on the same LR image")
        bits = self._last[1]
        report = image_bit_report(self.model, self.layers, bits, self.scale, self.w_bits)
        pixels = sum(p.height * p.width for p in bits)
        bitops_g = sum(report.patch_bitops) / pixels * self.ref_pixels / GIGA
        if self.bit_log is not None:
            self.bit_log[name] = {
                "fab": report.fab,
                "bitops_g": bitops_g,
                "bitops_image_g": report.bitops_total / GIGA,
                "patches": [p._asdict() for p in bits],
            }
        if self.bitmap_dir is not None:
            write_image(self.bitmap_dir / f"{name}.png", bit_map(lr, bits))
        return {"fab": report.fab, "bitops_g": bitops_g}


def eval_hooks(
    model: nn.Module,
    controller: DynamicController | None,
    scale: int,
    bit_log: dict[str, dict[str, Any]] | None = None,
    bitmap_dir: Path | None = None,
) -> tuple[Callable[[torch.Tensor], torch.Tensor] | None, Callable[[str, torch.Tensor], dict[str, float]] | None]:
    """(upscaler, per_image) for `evaluate`: patch-wise for Granular-DQ, per-image bits for AdaBM, (None, None)."""
    if isinstance(controller, GranularityBitController):
        runner = PatchwiseRunner(model, controller, scale, bit_log=bit_log, bitmap_dir=bitmap_dir)
        return runner, runner.measure
    if isinstance(controller, BitController):
        return None, per_image_metrics(model, controller, scale, bit_log)
    return None, None
