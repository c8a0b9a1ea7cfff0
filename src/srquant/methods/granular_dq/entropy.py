"""Patch entropy for E2B: the Gaussian-KDE histogram entropy of a grayscale LR patch."""

from __future__ import annotations

import torch

from srquant.methods.training import grayscale


def patch_entropy(x: torch.Tensor, bins: int = 32, sigma: float = 0.0255) -> torch.Tensor:
    """Per-sample Gaussian-KDE histogram entropy (nats) of the grayscale image: soft counts at bin centres on [0, 1]."""
    if x.dim() == 3:
        x = x.unsqueeze(0)
    gray = grayscale(x.detach().float()).clamp(0, 1).flatten(1)  # (B, N)
    centres = (torch.arange(bins, dtype=torch.float32, device=x.device) + 0.5) / bins
    out = []
    for row in gray:  # one sample at a time: N x bins stays small for 96x96 patches
        weights = torch.exp(-0.5 * ((row[:, None] - centres[None, :]) / sigma) ** 2).sum(dim=0)
        p = weights / weights.sum().clamp_min(1e-12)
        out.append(-(p * torch.log(p.clamp_min(1e-12))).sum())
    return torch.stack(out)
