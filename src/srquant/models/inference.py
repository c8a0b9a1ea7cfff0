"""Whole-image and tiled inference for any network (RGB in [0, 1], output s times larger).

- Tiny inputs: a side shorter than `MIN_SIDE` LR pixels is replicate-padded to it and the output cropped back,
  so a 1x1 image gives the flat block it should (unpadded, ESWT turned a flat 1x1 image into values 6 to 255).
- Tiles: `tile` LR pixels square (rounded up to the model's `pad_multiple`), step `tile - overlap`; each tile
  contributes only its interior (`overlap // 2` pixels are trimmed on every side that faces another tile), so a
  network whose receptive-field radius is at most `overlap // 2` gives the whole-image result exactly. The
  output is produced in horizontal strips that are final when emitted (`upscale_strips`), so a caller can write
  them out as they come and memory grows with the tile, not the image.
- Without tiles, a large input is first checked against the free memory (a probe forward measures the bytes per
  LR pixel), and refused in one line naming a tile size that fits, instead of running out of memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from srquant.errors import SrquantError

MIN_SIDE = 4  # LR pixels: every zoo network gives a flat block for a flat image from here on
DEFAULT_OVERLAP = 16
CHECK_PIXELS = 512 * 512  # untiled inputs from this size on are checked against the free memory first
MEMORY_SHARE = 0.8  # of the free memory an untiled run may take


def minimum_tile(overlap: int) -> int:
    """The smallest tile for an overlap: twice the overlap (the step is then at least half a tile), and 8."""
    return max(2 * overlap, 8)


def check_tiling(tile: int | None, overlap: int) -> None:
    """One line for a tile size or overlap that cannot work (a step of 1 pixel would take ages)."""
    if overlap < 0:
        raise SrquantError(f"--tile-overlap must be 0 or more LR pixels, got {overlap}")
    if tile is not None and tile < minimum_tile(overlap):
        raise SrquantError(
            f"--tile must be at least {minimum_tile(overlap)} LR pixels (twice the tile overlap of {overlap}; "
            f"see --tile-overlap), got {tile}"
        )


def _forward(model: nn.Module, lr: torch.Tensor) -> torch.Tensor:
    """The model on one batch; sides below MIN_SIDE are replicate-padded first and cropped after."""
    height, width = lr.shape[-2:]
    if height >= MIN_SIDE and width >= MIN_SIDE:
        return model(lr)
    padded = F.pad(lr, (0, max(MIN_SIDE - width, 0), 0, max(MIN_SIDE - height, 0)), mode="replicate")
    scale = int(model.scale)
    return model(padded)[..., : height * scale, : width * scale]


def _starts(length: int, tile: int, stride: int) -> list[int]:
    """Tile origins along one side: a regular grid plus one tile flush with the far edge."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def _interior(start: int, tile: int, length: int, margin: int) -> tuple[int, int, int]:
    """(end, first, last) of a tile: its end, and the LR rows (or columns) it contributes."""
    end = min(start + tile, length)
    return end, (start + margin if start > 0 else 0), (end - margin if end < length else length)


@torch.no_grad()
def upscale_strips(
    model: nn.Module, lr: torch.Tensor, tile: int, overlap: int = DEFAULT_OVERLAP
) -> Iterator[tuple[int, torch.Tensor]]:
    """Tiled inference on a 1x3xHxW (or 3xHxW) LR image in [0, 1] or uint8, yielding finished output strips
    `(first output row, 1x3xRxW' float strip)` top to bottom. The LR image is converted to float tile by tile.
    Each strip is the caller's to change in place (e.g. while converting it to uint8)."""
    check_tiling(tile, overlap)
    if not getattr(model, "supports_tiling", True):
        raise SrquantError(f"{type(model).__name__} runs patch-wise by itself: --tile does not apply")
    image = lr if lr.dim() == 4 else lr.unsqueeze(0)
    if image.shape[0] != 1:
        raise SrquantError("tiled inference takes one image at a time")
    scale = int(model.scale)
    multiple = int(getattr(model, "pad_multiple", 1))
    tile = -(-tile // multiple) * multiple
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    _, channels, height, width = image.shape
    margin = overlap // 2
    tops, lefts = _starts(height, tile, tile - overlap), _starts(width, tile, tile - overlap)
    firsts = [_interior(top, tile, height, margin)[1] for top in tops] + [height]
    done = 0  # LR rows already emitted
    acc = torch.zeros(1, channels, 0, width * scale, device=device)
    weight = torch.zeros(1, 1, 0, width * scale, device=device)
    for index, top in enumerate(tops):
        bottom, r0, r1 = _interior(top, tile, height, margin)
        grow = (r1 - done) * scale - acc.shape[2]
        if grow > 0:
            acc = torch.cat([acc, acc.new_zeros(1, channels, grow, width * scale)], dim=2)
            weight = torch.cat([weight, weight.new_zeros(1, 1, grow, width * scale)], dim=2)
        for left in lefts:
            right, c0, c1 = _interior(left, tile, width, margin)
            crop = image[..., top:bottom, left:right].to(device)
            crop = crop.float().div_(255.0) if crop.dtype == torch.uint8 else crop
            sr = _forward(model, crop)
            rows = slice((r0 - done) * scale, (r1 - done) * scale)
            cols = slice(c0 * scale, c1 * scale)
            acc[..., rows, cols] += sr[
                ..., (r0 - top) * scale : (r1 - top) * scale, (c0 - left) * scale : (c1 - left) * scale
            ]
            weight[..., rows, cols] += 1.0
        finished = (firsts[index + 1] - done) * scale
        if finished > 0:
            # Divided in place: the emitted strip is a view of the accumulator's rows, which are not used again.
            yield done * scale, acc[..., :finished, :].div_(weight[..., :finished, :])
            acc, weight = acc[..., finished:, :], weight[..., finished:, :]
            done = firsts[index + 1]


def _free_bytes(device: torch.device) -> int | None:
    """Free memory on the device (MemAvailable on the CPU), or None where it cannot be read."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


@torch.no_grad()
def bytes_per_pixel(model: nn.Module, side: int = 96) -> float | None:
    """Peak memory of a forward pass per LR pixel, measured on a probe input (None where it cannot be measured)."""
    multiple = int(getattr(model, "pad_multiple", 1))
    side = -(-side // multiple) * multiple
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    probe = torch.zeros(1, 3, side, side, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        model(probe)
        return (torch.cuda.max_memory_allocated(device) - before) / side**2
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak resident set (VmHWM)
    except OSError:
        return None
    before = _status_kib("VmRSS")
    model(probe)
    peak = _status_kib("VmHWM")
    if before is None or peak is None:
        return None
    return max(peak - before, 1) * 1024 / side**2


def check_fits(model: nn.Module, height: int, width: int) -> None:
    """Refuse, in one line naming a tile that fits, an untiled input that would not fit in the free memory."""
    if height * width < CHECK_PIXELS:
        return
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    free, per_pixel = _free_bytes(device), bytes_per_pixel(model)
    if free is None or per_pixel is None:
        return
    need = per_pixel * height * width
    if need > MEMORY_SHARE * free:
        side = int(math.sqrt(0.5 * MEMORY_SHARE * free / per_pixel)) // 8 * 8
        tile = max(minimum_tile(DEFAULT_OVERLAP), min(side, 1024))
        raise SrquantError(
            f"upscaling {width}x{height} LR pixels at once needs about {need / 1e9:.1f} GB, more than the "
            f"{free / 1e9:.1f} GB free: use --tile {tile}"
        )


@torch.no_grad()
def upscale(
    model: nn.Module, lr: torch.Tensor, tile: int | None = None, overlap: int = DEFAULT_OVERLAP
) -> torch.Tensor:
    """Super-resolve a Bx3xHxW batch in [0, 1]; with `tile`, in overlapping tiles (one image at a time)."""
    check_tiling(tile, overlap)
    height, width = lr.shape[-2:]
    if tile is None or (height <= tile and width <= tile):
        check_fits(model, height, width)
        return _forward(model, lr)
    return torch.cat([strip for _, strip in upscale_strips(model, lr, tile, overlap)], dim=2)
