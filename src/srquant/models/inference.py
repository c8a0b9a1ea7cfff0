"""Whole-image and tiled inference for any zoo model (RGB in [0, 1], output s times larger)."""

from __future__ import annotations

import torch
from torch import nn

from srquant.errors import SrquantError


def _starts(length: int, tile: int, stride: int) -> list[int]:
    """Tile origins along one side: a regular grid plus one tile flush with the far edge."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


@torch.no_grad()
def upscale(model: nn.Module, lr: torch.Tensor, tile: int | None = None, overlap: int = 16) -> torch.Tensor:
    """Super-resolve a Bx3xHxW batch; with `tile`, process overlapping tiles so memory stays bounded.

    Tiles are `tile` LR pixels square (rounded up to the model's `pad_multiple`), step `tile - overlap`.
    Each tile contributes only its interior: `overlap // 2` pixels are trimmed on every side that faces
    another tile, so a CNN whose receptive-field radius is at most `overlap // 2` gives exactly the
    whole-image result. Where trimmed interiors still overlap (the last row/column), they are averaged.
    """
    scale = int(model.scale)
    if tile is None or (lr.shape[-2] <= tile and lr.shape[-1] <= tile):
        return model(lr)
    if not getattr(model, "supports_tiling", True):
        raise SrquantError(f"{type(model).__name__} runs patch-wise by itself: --tile does not apply")
    multiple = int(getattr(model, "pad_multiple", 1))
    tile = -(-tile // multiple) * multiple
    if overlap < 0 or overlap >= tile:
        raise SrquantError(f"tile overlap must be in [0, {tile}), got {overlap}")
    b, c, h, w = lr.shape
    out = lr.new_zeros(b, c, h * scale, w * scale)
    weight = lr.new_zeros(1, 1, h * scale, w * scale)
    margin = overlap // 2
    for top in _starts(h, tile, tile - overlap):
        bottom = min(top + tile, h)
        r0, r1 = (top + margin if top > 0 else 0), (bottom - margin if bottom < h else h)
        for left in _starts(w, tile, tile - overlap):
            right = min(left + tile, w)
            c0, c1 = (left + margin if left > 0 else 0), (right - margin if right < w else w)
            sr = model(lr[..., top:bottom, left:right])
            rows, cols = slice(r0 * scale, r1 * scale), slice(c0 * scale, c1 * scale)
            out[..., rows, cols] += sr[
                ..., (r0 - top) * scale : (r1 - top) * scale, (c0 - left) * scale : (c1 - left) * scale
            ]
            weight[..., rows, cols] += 1.0
    return out / weight
