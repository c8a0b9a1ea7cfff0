"""Padding shared by the window-attention architectures."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def reflect_pad_to(x: torch.Tensor, multiple_h: int, multiple_w: int) -> torch.Tensor:
    """Reflect-pad the bottom and right of ``x`` up to multiples of (multiple_h, multiple_w).

    ESWT and LMLT reflect once, which fails when the padding is not smaller than the side; such sides are
    reflected repeatedly here (a 1-pixel side is replicated once first), so any size works and every size the
    originals accept gives exactly their result.
    """
    height, width = x.shape[-2:]
    target_h = math.ceil(height / multiple_h) * multiple_h
    target_w = math.ceil(width / multiple_w) * multiple_w
    while True:
        height, width = x.shape[-2:]
        need_h, need_w = target_h - height, target_w - width
        if need_h == 0 and need_w == 0:
            return x
        if (need_h and height == 1) or (need_w and width == 1):
            grow_h, grow_w = int(need_h > 0 and height == 1), int(need_w > 0 and width == 1)
            x = F.pad(x, (0, grow_w, 0, grow_h), mode="replicate")
            continue
        x = F.pad(x, (0, min(need_w, width - 1), 0, min(need_h, height - 1)), mode="reflect")
