"""Random-allocation controls for the dynamic methods: the same bits in the same proportions, handed out by chance.

A dynamic method is only worth its controller if it beats the same bit histogram spread at random. The draws
are deterministic: each image or patch gets a uniform number from a keyed hash of its 8-bit content, so a control
gives the same bits in every process and on every device, without a random generator whose state depends on the
order images are run in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch

from srquant.errors import SrquantError


def content_uniform(x: torch.Tensor, seed: int) -> torch.Tensor:
    """One number in [0, 1) per sample of a batch, from a hash of its content rounded to 8 bits and the seed."""
    codes = (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    key = int(seed).to_bytes(8, "little", signed=True)
    values = []
    for sample in codes:
        digest = hashlib.blake2b(sample.numpy().tobytes(), digest_size=8, key=key).digest()
        values.append(int.from_bytes(digest, "little") / 2**64)
    return torch.tensor(values, dtype=torch.float64)


def check_histogram(histogram: Mapping[int, float]) -> dict[int, float]:
    """Shares per value, normalised to sum to 1; refuses an empty or negative histogram."""
    if not histogram or any(share < 0 for share in histogram.values()) or sum(histogram.values()) <= 0:
        raise SrquantError(f"a random control needs a non-empty histogram of non-negative shares, got {histogram}")
    total = sum(histogram.values())
    return {int(value): share / total for value, share in sorted(histogram.items())}


def draw_from_histogram(u: torch.Tensor, histogram: Mapping[int, float]) -> torch.Tensor:
    """Map uniforms in [0, 1) to values with the histogram's shares (inverse CDF over the sorted values)."""
    shares = check_histogram(histogram)
    values = torch.tensor(list(shares), dtype=torch.int64)
    edges = torch.tensor(list(shares.values()), dtype=torch.float64).cumsum(0)
    index = torch.searchsorted(edges, u.to(torch.float64), right=True).clamp_max(len(values) - 1)
    return values[index]
