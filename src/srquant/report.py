"""`srquant report`: a static HTML page that shows what quantization does to the pictures, not only the numbers.

For each model (zoo names, quantized checkpoints, user networks) and dataset the page gives PSNR/SSIM, the drop
from the float network, FAB, BitOPs, size and calibration time. For a few images (those where the models lose
most against the float network, or the ones named) it shows side-by-side crops of HR, bicubic, float and every
model, each with its crop PSNR, optionally their error maps, and the bit map of dynamic-bit models. Plots of PSNR
against BitOPs and against size need matplotlib (`pip install "srquant[report]"`); without it the page says so.
The page opens from disk: every image is a PNG beside it, referenced by a relative path.
"""

from __future__ import annotations

import html
import importlib.metadata
import platform
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from srquant.data.benchmark import BenchmarkImage, BenchmarkSet
from srquant.data.imresize import imresize
from srquant.data.io import to_tensor, to_uint8, write_image
from srquant.errors import SrquantError
from srquant.evaluate import DatasetResult, evaluate_dataset, image_metrics_of
from srquant.metrics.psnr_ssim import psnr_y
from srquant.models.inference import upscale
from srquant.outputs import atomic_write_text
from srquant.runtime import cpu_name

CROP = 96  # HR pixels of each side-by-side crop (scaled up for display)
SHOWN = 288  # display side of a crop in the page
BIT_COLOURS = {
    2: (120, 0, 120),
    3: (180, 0, 60),
    4: (220, 40, 40),
    5: (240, 140, 20),
    6: (230, 220, 40),
    7: (150, 200, 50),
    8: (40, 170, 60),
}


@dataclass
class Entry:
    """One model on the page: its label, the module to run, and what its checkpoint says about it."""

    label: str
    model: nn.Module
    network: nn.Module
    size_mb: float | None = None
    bitops_g: float | None = None
    calib_seconds: float | None = None
    is_float: bool = False
    results: dict[str, DatasetResult] = field(default_factory=dict)


@dataclass
class Figure:
    """One image shown: its crops (label -> PNG path relative to the page), crop PSNRs and bit maps."""

    dataset: str
    image: str
    crops: dict[str, str]
    crop_psnr: dict[str, float]
    errors: dict[str, str]
    bit_maps: dict[str, str]
    box: tuple[int, int, int, int]


def _versions() -> str:
    names = ("srquant", "torch", "numpy", "pillow", "onnxruntime", "matplotlib")
    found = []
    for name in names:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return ", ".join(found)


def _machine() -> str:
    cpu = cpu_name()
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {torch.get_num_threads()} torch threads, Python {platform.python_version()}{gpu}"


def _worst_box(errors: Sequence[np.ndarray], height: int, width: int, crop: int) -> tuple[int, int, int, int]:
    """(top, left, h, w) of the crop where the models' mean absolute error is largest (on a coarse grid)."""
    side_h, side_w = min(crop, height), min(crop, width)
    total = np.mean([e.mean(axis=2) for e in errors], axis=0)
    integral = np.pad(total, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    best, box = -1.0, (0, 0, side_h, side_w)
    step = max(crop // 4, 1)
    for top in range(0, height - side_h + 1, step):
        for left in range(0, width - side_w + 1, step):
            bottom, right = top + side_h, left + side_w
            score = integral[bottom, right] - integral[top, right] - integral[bottom, left] + integral[top, left]
            if score > best:
                best, box = score, (top, left, side_h, side_w)
    return box


def _cut(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    top, left, h, w = box
    return image[top : top + h, left : left + w]


def _enlarged(image: np.ndarray) -> np.ndarray:
    """A crop scaled to the page's display size with nearest neighbour (pixels stay visible)."""
    factor = max(SHOWN // max(image.shape[:2]), 1)
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def _layer_bits_strip(record: dict[str, Any]) -> np.ndarray:
    """AdaBM's per-layer bits of one image as a strip of coloured cells (one per adaptive layer)."""
    bits = list(record.get("layers", {}).values())
    strip = np.zeros((24, max(len(bits), 1) * 12, 3), np.uint8)
    for i, bit in enumerate(bits):
        strip[:, i * 12 : i * 12 + 11] = BIT_COLOURS.get(int(bit), (128, 128, 128))
    return strip


@torch.no_grad()
def _figure(
    entries: list[Entry], pair: BenchmarkImage, scale: int, folder: Path, dataset: str, error_maps: bool
) -> Figure:
    """Run every model on one image and write its crops (and error maps, bit maps) under `folder`."""
    outputs: dict[str, np.ndarray] = {"HR": pair.hr}
    bicubic = imresize(pair.lr, scale)
    outputs["bicubic"] = bicubic[: pair.hr.shape[0], : pair.hr.shape[1]]
    bit_maps: dict[str, str] = {}
    for entry in entries:
        device = next((p.device for p in entry.model.parameters()), torch.device("cpu"))
        lr = to_tensor(pair.lr).to(device)
        outputs[entry.label] = to_uint8(upscale(entry.model, lr))
        painter, recorder = getattr(entry.model, "bit_map", None), getattr(entry.model, "image_record", None)
        picture = painter(lr) if callable(painter) else _layer_bits_strip(recorder(lr)) if callable(recorder) else None
        if picture is not None:
            name = f"{dataset}_{pair.name}_{_slug(entry.label)}_bits.png"
            write_image(folder / name, picture)
            bit_maps[entry.label] = name
    models = [outputs[e.label] for e in entries if not e.is_float]
    diffs = [np.abs(m.astype(np.int16) - pair.hr.astype(np.int16)) for m in (models or [outputs["bicubic"]])]
    box = _worst_box(diffs, pair.hr.shape[0], pair.hr.shape[1], CROP)
    crops, crop_psnr, errors = {}, {}, {}
    for label, picture in outputs.items():
        piece = _cut(picture, box)
        name = f"{dataset}_{pair.name}_{_slug(label)}.png"
        write_image(folder / name, _enlarged(piece))
        crops[label] = name
        if label != "HR":
            crop_psnr[label] = psnr_y(piece, _cut(pair.hr, box), 0)
            if error_maps:
                error = np.abs(piece.astype(np.int16) - _cut(pair.hr, box).astype(np.int16)).max(axis=2)
                heat = np.clip(error * 8, 0, 255).astype(np.uint8)
                errors[label] = f"{dataset}_{pair.name}_{_slug(label)}_error.png"
                write_image(folder / errors[label], _enlarged(np.stack([heat, heat // 3, 255 - heat], axis=2)))
    return Figure(dataset, pair.name, crops, crop_psnr, errors, bit_maps, box)


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label)[:60]


def _plots(entries: list[Entry], datasets: list[str], folder: Path) -> list[str]:
    """PSNR against BitOPs and against size, one point per model and dataset (PNG files; none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    for key, axis in (("bitops_g", "BitOPs (G, 1280x720 output)"), ("size_mb", "size (MB)")):
        fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=110)
        for dataset in datasets:
            xs, ys, labels = [], [], []
            for entry in entries:
                result = entry.results.get(dataset)
                value = result.extras.get(key, getattr(entry, key)) if result else None
                if result is not None and value is not None:
                    xs.append(value)
                    ys.append(result.psnr)
                    labels.append(entry.label)
            ax.scatter(xs, ys, label=dataset)
            for x, y, label in zip(xs, ys, labels, strict=True):
                ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(axis)
        ax.set_ylabel("PSNR (dB, Y)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        name = f"psnr_vs_{key.split('_')[0]}.png"
        fig.savefig(folder / name)
        plt.close(fig)
        written.append(name)
    return written


def choose_images(entries: list[Entry], dataset: str, count: int) -> list[str]:
    """The images where the quantized models lose most against the float one (or against the best model)."""
    reference = next((e for e in entries if e.is_float), None)
    others = [e for e in entries if not e.is_float] or entries
    losses: dict[str, float] = {}
    for entry in others:
        scores = {s.name: s.psnr for s in entry.results[dataset].per_image}
        base = {s.name: s.psnr for s in reference.results[dataset].per_image} if reference else None
        for name, psnr in scores.items():
            gap = (base[name] - psnr) if base else -psnr
            losses[name] = max(losses.get(name, -np.inf), gap)
    return [name for name, _ in sorted(losses.items(), key=lambda item: -item[1])[:count]]


def build_report(
    entries: list[Entry],
    datasets: list[BenchmarkSet],
    scale: int,
    out: Path,
    images: list[str] | None = None,
    per_dataset: int = 2,
    error_maps: bool = False,
    progress: bool = False,
    command: str | None = None,
) -> Path:
    """Evaluate the models, write the crops and plots, and write `out/index.html`; returns the page's path."""
    if not entries:
        raise SrquantError("a report needs at least one model")
    out.mkdir(parents=True, exist_ok=True)
    for entry in entries:
        for bench in datasets:
            (entry.results[bench.name],) = evaluate_dataset(
                entry.model, bench, scale, ("basicsr",), None, progress, image_metrics_of(entry.model)
            )
    figures = []
    for bench in datasets:
        names = [n for n in (images or []) if n in {p.stem for p in bench.image_paths()}]
        chosen = names or ([] if images else choose_images(entries, bench.name, per_dataset))
        for pair in bench.iter_pairs(scale):
            if pair.name in chosen:
                figures.append(_figure(entries, pair, scale, out, bench.name, error_maps))
    if images and not figures:
        raise SrquantError(f"none of the images {', '.join(images)} is in {', '.join(b.name for b in datasets)}")
    plots = _plots(entries, [b.name for b in datasets], out)
    page = _page(entries, [b.name for b in datasets], scale, figures, plots, command or _command())
    return atomic_write_text(out / "index.html", page)


def _command() -> str:
    return " ".join(shlex.quote(a) for a in ["srquant", *sys.argv[1:]]) if sys.argv else "srquant report"


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _page(
    entries: list[Entry], datasets: list[str], scale: int, figures: list[Figure], plots: list[str], command: str
) -> str:
    """The HTML of the report."""
    esc = html.escape
    reference = next((e for e in entries if e.is_float), None)
    rows = []
    for dataset in datasets:
        for entry in entries:
            r = entry.results[dataset]
            drop = r.psnr - reference.results[dataset].psnr if reference and not entry.is_float else None
            rows.append(
                f"<tr><td>{esc(entry.label)}</td><td>{esc(dataset)}</td><td>{r.psnr:.2f}</td><td>{r.ssim:.4f}</td>"
                f"<td>{_cell(drop, '+.2f')}</td><td>{_cell(r.extras.get('fab'), '.2f')}</td>"
                f"<td>{_cell(r.extras.get('bitops_g', entry.bitops_g), '.2f')}</td>"
                f"<td>{_cell(entry.size_mb, '.3f')}</td>"
                f"<td>{_cell(entry.calib_seconds, '.0f')}</td></tr>"
            )
    table = (
        "<table><tr><th>model</th><th>dataset</th><th>PSNR</th><th>SSIM</th><th>drop from FP</th><th>FAB</th>"
        "<th>BitOPs (G)</th><th>size (MB)</th><th>calibration (s)</th></tr>" + "".join(rows) + "</table>"
    )
    blocks = []
    for fig in figures:
        tiles = []
        for label, name in fig.crops.items():
            caption = esc(label) + (f"<br>{fig.crop_psnr[label]:.2f} dB" if label in fig.crop_psnr else "<br>&nbsp;")
            tiles.append(
                f'<figure><img src="{esc(name)}" alt="{esc(label)}"><figcaption>{caption}</figcaption></figure>'
            )
        for label, name in fig.errors.items():
            tiles.append(
                f'<figure><img src="{esc(name)}" alt="error {esc(label)}"><figcaption>|SR - HR| {esc(label)}'
                "</figcaption></figure>"
            )
        maps = "".join(
            f'<figure><img class="bits" src="{esc(name)}" alt="bits {esc(label)}"><figcaption>bits: {esc(label)}'
            "</figcaption></figure>"
            for label, name in fig.bit_maps.items()
        )
        top, left, h, w = fig.box
        blocks.append(
            f"<h3>{esc(fig.dataset)} / {esc(fig.image)} (HR crop {w}x{h} at ({left}, {top}); crop PSNR on Y)</h3>"
            f'<div class="row">{"".join(tiles)}</div>' + (f'<div class="row">{maps}</div>' if maps else "")
        )
    plot_html = (
        "".join(f'<img class="plot" src="{esc(p)}" alt="{esc(p)}">' for p in plots)
        if plots
        else '<p>Plots need matplotlib: <code>pip install "srquant[report]"</code>, then run the command again.</p>'
    )
    style = (
        "body{font-family:sans-serif;margin:24px;color:#222}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}"
        ".row{display:flex;flex-wrap:wrap;gap:8px}figure{margin:0;text-align:center;font-size:13px}"
        f"figure img{{width:{SHOWN}px;image-rendering:pixelated}}img.bits{{width:auto;max-width:{SHOWN}px}}"
        "img.plot{max-width:48%}code{background:#f3f3f3;padding:1px 4px}"
    )
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>srquant report x{scale}</title>'
        f"<style>{style}</style></head><body><h1>srquant report, x{scale}</h1>"
        f"<h2>Scores</h2>{table}<h2>Quality against cost</h2>{plot_html}<h2>Crops</h2>{''.join(blocks)}"
        f"<h2>How this page was made</h2><p>Command: <code>{esc(command)}</code></p>"
        f"<p>Software: {esc(_versions())}</p><p>Machine: {esc(_machine())}</p></body></html>\n"
    )
