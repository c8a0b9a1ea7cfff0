"""Granular-DQ's patch-wise inference: each LR patch at its own bit, the bits' cost, bit maps, the model wrapper."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from srquant.errors import SrquantError
from srquant.methods.granular_dq.controller import GranularityBitController, attach_controller
from srquant.metrics.complexity import GIGA, OpsReport, bitops, lr_size_for_output
from srquant.quant.accounting import ops_report

PALETTE: dict[int, tuple[int, int, int]] = {
    4: (220, 40, 40),
    5: (240, 140, 20),
    6: (230, 220, 40),
    8: (40, 170, 60),
}


class PatchBit(NamedTuple):
    """One LR patch (top, left, height, width) and the activation bit it ran at."""

    top: int
    left: int
    height: int
    width: int
    bit: int


def _starts(length: int, patch: int, step: int) -> list[int]:
    """Patch origins along one axis: every `step`, the last one flush with the border."""
    if length <= patch:
        return [0]
    starts = list(range(0, length - patch + 1, step))
    if starts[-1] != length - patch:
        starts.append(length - patch)
    return starts


def patch_boxes(height: int, width: int, patch: int = 96, step: int = 90) -> list[tuple[int, int, int, int]]:
    """(top, left, h, w) of the overlapping patches that tile an LR image, row-major."""
    if patch < 1 or not 1 <= step <= patch:
        raise SrquantError(f"patch-wise inference needs patch >= 1 and 1 <= step <= patch, got {patch}, {step}")
    return [
        (t, left, min(patch, height), min(patch, width))
        for t in _starts(height, patch, step)
        for left in _starts(width, patch, step)
    ]


def paste_patch(
    out: torch.Tensor, weight: torch.Tensor, sr_patch: torch.Tensor, box: tuple[int, int, int, int], scale: int
) -> None:
    """Add one patch's SR output (1xCxhxw) at its LR box (top, left, h, w) to the canvas and count it in `weight`;
    the image is `out / weight` once every patch is in (overlaps averaged)."""
    t, c, h, w = box
    out[..., t * scale : (t + h) * scale, c * scale : (c + w) * scale] += sr_patch
    weight[..., t * scale : (t + h) * scale, c * scale : (c + w) * scale] += 1


@torch.no_grad()
def upscale_patchwise(
    model: nn.Module,
    controller: GranularityBitController | None,
    lr_image: torch.Tensor,
    patch: int = 96,
    step: int = 90,
    batch: int = 8,
) -> tuple[torch.Tensor, list[PatchBit]]:
    """Super-resolve an LR image (3xHxW or 1x3xHxW) patch by patch, each at its own bit; overlaps are averaged.

    The controller must be attached to the model (`attach_controller`); with None (or quantization off) every
    patch is reported at 32 bits. Returns the SR image (same rank as the input) and the per-patch bits.
    """
    squeeze = lr_image.dim() == 3
    x = lr_image.unsqueeze(0) if squeeze else lr_image
    if x.dim() != 4 or x.shape[0] != 1:
        raise SrquantError(f"upscale_patchwise takes one image (3xHxW or 1x3xHxW), got {tuple(lr_image.shape)}")
    if controller is not None:
        controller.eval()
    height, width = x.shape[-2:]
    boxes = patch_boxes(height, width, patch, step)
    out = weight = None
    scale = 0
    bits: list[PatchBit] = []
    for i in range(0, len(boxes), batch):
        group = boxes[i : i + batch]
        crops = torch.cat([x[..., t : t + h, c : c + w] for t, c, h, w in group])
        if controller is not None:
            controller.last_bits = None
        sr = model(crops)
        chosen = controller.last_bits.tolist() if controller is not None and controller.last_bits is not None else None
        if out is None:
            scale = sr.shape[-1] // group[0][3]
            out = x.new_zeros(1, sr.shape[1], height * scale, width * scale)
            weight = x.new_zeros(1, 1, height * scale, width * scale)
        assert weight is not None
        for k, (t, c, h, w) in enumerate(group):
            paste_patch(out, weight, sr[k : k + 1], (t, c, h, w), scale)
            bits.append(PatchBit(t, c, h, w, int(chosen[k]) if chosen is not None else 32))
    assert out is not None and weight is not None
    sr_image = out / weight
    return (sr_image[0] if squeeze else sr_image), bits


@dataclass
class ImageBitReport:
    """Per-image bit usage: each patch's bit, FAB, per-patch BitOPs and the image-level BitOPs."""

    patch_bits: list[PatchBit]
    fab: float
    patch_bitops: list[float]
    bitops: float  # pixel-weighted mean over patches (MACs-based BitOPs)
    bitops_total: float  # sum over patches: what the overlapping patches cost together

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly form."""
        return {
            "patch_bits": [p._asdict() for p in self.patch_bits],
            "fab": self.fab,
            "patch_bitops": self.patch_bitops,
            "bitops": self.bitops,
            "bitops_total": self.bitops_total,
        }


def image_bit_report(
    model: nn.Module,
    layers: Sequence[str],
    patch_bits: Sequence[PatchBit],
    scale: int,
    w_bits: int = 8,
    body_only: bool = False,
) -> ImageBitReport:
    """FAB = mean patch bit; per patch BitOPs with every body layer at (w_bits, patch bit), others at 32/32.

    With `body_only` the BitOPs count only the body layers' rows.
    """
    if not patch_bits:
        raise SrquantError("image_bit_report needs at least one patch")
    reports: dict[tuple[int, int], OpsReport] = {}
    per_patch = []
    for p in patch_bits:
        size = (p.height, p.width)
        if size not in reports:
            rep = ops_report(model, scale, size)
            if body_only:
                rep = OpsReport(rep.lr_size, rep.out_size, tuple(r for r in rep.rows if r.name in set(layers)))
            reports[size] = rep
        per_patch.append(bitops(reports[size], {name: (w_bits, min(p.bit, 32)) for name in layers}))
    pixels = [p.height * p.width for p in patch_bits]
    fab = sum(p.bit for p in patch_bits) / len(patch_bits)
    weighted = sum(b * n for b, n in zip(per_patch, pixels, strict=True)) / sum(pixels)
    return ImageBitReport(list(patch_bits), fab, per_patch, weighted, float(sum(per_patch)))


def bit_map(lr_image: torch.Tensor | np.ndarray, patch_bits: Sequence[PatchBit], alpha: float = 0.45) -> np.ndarray:
    """An HxWx3 uint8 image: each patch tinted by its bit's fixed colour, blended over the LR image."""
    if isinstance(lr_image, torch.Tensor):
        img = lr_image.detach().float().cpu()
        img = img[0] if img.dim() == 4 else img
        base = (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).astype(np.float32)
    else:
        base = np.asarray(lr_image, dtype=np.float32)
    if base.ndim != 3 or base.shape[2] != 3:
        raise SrquantError(f"bit_map needs an RGB image, got shape {base.shape}")
    tint = base.copy()
    for p in patch_bits:  # later patches win on overlaps
        colour = np.array(PALETTE.get(p.bit, (128, 128, 128)), dtype=np.float32)
        tint[p.top : p.top + p.height, p.left : p.left + p.width] = colour
    return np.clip((1 - alpha) * base + alpha * tint, 0, 255).round().astype(np.uint8)


class PatchwiseBitsModel(nn.Module):
    """A Granular-DQ network run as the method evaluates it: LR patches of 96 px (step 90), each at its own bit.

    `forward` super-resolves each image of a batch patch-wise. For the last image it ran, `image_metrics` gives
    FAB (the mean patch bit) and BitOPs (G) of a 1280x720 output whose area is split between the bits in the
    proportions of this image's patch pixels (ops are linear in pixels, so this is comparable with the other
    methods' column), `image_record` the patch boxes and bits, and `bit_map` the bits tinted over the image.
    """

    supports_tiling = False  # it always runs patch-wise

    def __init__(
        self, network: nn.Module, controller: GranularityBitController, head: str, patch: int = 96, stride: int = 90
    ) -> None:
        super().__init__()
        self.network, self.controller, self.head = network, controller, head
        self.patch, self.stride = patch, stride
        self.scale = int(network.scale)
        self.pad_multiple = int(getattr(network, "pad_multiple", 1))
        self.attachment = attach_controller(network, controller, head)
        self.w_bits = int(network.get_submodule(controller.layer_names[0]).weight_quantizer.bits)
        self.ref_pixels = math.prod(lr_size_for_output(self.scale))
        self._last: tuple[torch.Tensor, list[PatchBit]] | None = None
        self.train(network.training)  # a wrapper of an eval-mode network is in eval mode too

    def use_controller(self, controller: GranularityBitController) -> None:
        """Run with another controller (e.g. `controller.randomized(...)`, the random control) from now on."""
        self.attachment.detach(self.network, self.controller)
        self.controller = controller
        self.attachment = attach_controller(self.network, controller, self.head)
        self._last = None

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        outputs = []
        for image in lr.split(1):
            sr, bits = upscale_patchwise(self.network, self.controller, image, self.patch, self.stride)
            self._last = (image, bits)
            outputs.append(sr)
        return torch.cat(outputs)

    def patch_bits(self, lr: torch.Tensor) -> list[PatchBit]:
        """The patches and bits of one LR image (from the last call when it was on this image)."""
        image = lr if lr.dim() == 4 else lr.unsqueeze(0)
        if self._last is None or not (self._last[0] is image or torch.equal(self._last[0], image)):
            self(image)
        assert self._last is not None
        return self._last[1]

    def _report(self, lr: torch.Tensor) -> tuple[ImageBitReport, float]:
        bits = self.patch_bits(lr)
        report = image_bit_report(self.network, self.controller.layer_names, bits, self.scale, self.w_bits)
        pixels = sum(p.height * p.width for p in bits)
        return report, sum(report.patch_bitops) / pixels * self.ref_pixels / GIGA

    def image_metrics(self, lr: torch.Tensor) -> dict[str, float]:
        """FAB and BitOPs (G) of one LR image at the bits its patches get."""
        report, bitops_g = self._report(lr)
        return {"fab": report.fab, "bitops_g": bitops_g}

    def image_record(self, lr: torch.Tensor) -> dict[str, object]:
        """FAB, BitOPs and every patch's box and bit of one LR image."""
        report, bitops_g = self._report(lr)
        return {
            "fab": report.fab,
            "bitops_g": bitops_g,
            "bitops_image_g": report.bitops_total / GIGA,
            "patches": [p._asdict() for p in report.patch_bits],
        }

    def bit_map(self, lr: torch.Tensor) -> np.ndarray:
        """The image with each patch tinted by its bit."""
        return bit_map(lr, self.patch_bits(lr))
