"""Evaluate a model on benchmark sets: PSNR/SSIM on Y under a named convention, images, wall time."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from srquant.data.benchmark import BenchmarkSet
from srquant.data.io import to_tensor, to_uint8
from srquant.errors import SrquantError
from srquant.metrics.psnr_ssim import get_convention, psnr_y, ssim_y
from srquant.models.inference import DEFAULT_OVERLAP, upscale
from srquant.runtime import release_memory


@dataclass(frozen=True)
class ImageScore:
    """PSNR/SSIM of one test image."""

    name: str
    psnr: float
    ssim: float


@dataclass
class DatasetResult:
    """Mean scores over one benchmark set, with the convention that produced them."""

    dataset: str
    scale: int
    convention: str
    psnr: float
    ssim: float
    images: int
    seconds: float
    per_image: list[ImageScore] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The JSON record of this result (per-image scores left out)."""
        record = {k: v for k, v in asdict(self).items() if k not in ("per_image", "extras", "scale")}
        record.update(self.extras)
        return record


def check_scale(model: nn.Module, scale: int) -> None:
    """Refuse to evaluate a model at a scale it does not produce."""
    model_scale = getattr(model, "scale", None)
    if model_scale is not None and int(model_scale) != scale:
        raise SrquantError(f"the model upscales x{model_scale}, but x{scale} was asked for")


def model_device(model: nn.Module) -> torch.device:
    """The device a model's parameters live on (CPU for a model without parameters)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


PerImage = Callable[[str, torch.Tensor], dict[str, float]]


def image_metrics_of(model: nn.Module) -> PerImage | None:
    """The per-image measurement a model offers (dynamic-bit models: FAB and BitOPs of the bits it used)."""
    measure = getattr(model, "image_metrics", None)
    return (lambda _name, lr: measure(lr)) if callable(measure) else None


@torch.no_grad()
def evaluate_dataset(
    model: nn.Module,
    dataset: BenchmarkSet,
    scale: int,
    conventions: Sequence[str] = ("basicsr",),
    tile: int | None = None,
    progress: bool = True,
    per_image: PerImage | None = None,
    overlap: int = DEFAULT_OVERLAP,
) -> list[DatasetResult]:
    """Run the model once on every LR image of a set; score it under each named convention.

    `per_image(name, lr)` may add numbers measured per image; they are averaged. It is called right after the
    image was super-resolved, with the same `lr` tensor. By default a model's own `image_metrics(lr)` is used
    (dynamic-bit models report FAB and BitOPs at the bits each image got).
    """
    if isinstance(conventions, str):
        conventions = (conventions,)
    for name in conventions:
        get_convention(name)
    check_scale(model, scale)
    model.eval()
    device = model_device(model)
    per_image = per_image or image_metrics_of(model)
    scores: dict[str, list[ImageScore]] = {name: [] for name in conventions}
    measured: dict[str, list[float]] = {}
    start = time.perf_counter()
    pairs = dataset.iter_pairs(scale)
    bar = tqdm(pairs, total=len(dataset), desc=f"{dataset.name} x{scale}", disable=not progress, leave=False)
    for pair in bar:
        lr = to_tensor(pair.lr).to(device)
        output = upscale(model, lr, tile, overlap)
        if not bool(torch.isfinite(output).all()):
            raise SrquantError(f"the model produced NaN/inf values on {dataset.name}/{pair.name}")
        sr = to_uint8(output)
        for key, value in (per_image(pair.name, lr) if per_image else {}).items():
            measured.setdefault(key, []).append(value)
        for name in conventions:
            scores[name].append(
                ImageScore(pair.name, psnr_y(sr, pair.hr, scale, name), ssim_y(sr, pair.hr, scale, name))
            )
        release_memory()  # bounded memory across images of different sizes (see srquant.runtime)
    seconds = time.perf_counter() - start
    return [
        DatasetResult(
            dataset=dataset.name,
            scale=scale,
            convention=name,
            psnr=sum(s.psnr for s in per) / len(per),
            ssim=sum(s.ssim for s in per) / len(per),
            images=len(per),
            seconds=seconds,
            per_image=per,
            extras={key: sum(values) / len(values) for key, values in measured.items()},
        )
        for name, per in scores.items()
    ]


def evaluate(
    model: nn.Module,
    datasets: Sequence[str],
    scale: int,
    conventions: Sequence[str] = ("basicsr",),
    assets: str | Path | None = None,
    tile: int | None = None,
    progress: bool = True,
    per_image: PerImage | None = None,
    overlap: int = DEFAULT_OVERLAP,
) -> list[DatasetResult]:
    """Evaluate on several benchmark sets by name; every set is located before any inference starts."""
    sets = [BenchmarkSet.from_assets(name, assets) for name in datasets]
    return [r for s in sets for r in evaluate_dataset(model, s, scale, conventions, tile, progress, per_image, overlap)]
