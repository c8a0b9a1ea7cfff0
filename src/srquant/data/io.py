"""Image reading and writing: every image becomes HxWx3 uint8 RGB, with a note when it had to be converted."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from srquant.errors import SrquantError

log = logging.getLogger(__name__)
_noted: set[str] = set()


def _note(path: Path, message: str) -> None:
    """Say once per file and process how an image was converted (visible without -v)."""
    key = str(path.resolve())
    if key not in _noted:
        _noted.add(key)
        log.warning("%s: %s", path.name, message)


IMAGE_SUFFIXES = (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".ppm")


def _to_rgb8(img: Image.Image, path: Path) -> np.ndarray:
    """Convert any PIL mode to 8-bit RGB; logs a note for grayscale, alpha and 16-bit inputs."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        _note(path, f"{mode} image scaled from {int(peak) + 1} levels to 8 bits")
        gray = np.clip(np.floor(arr * 255.0 / peak + 0.5), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8).copy()
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        _note(path, "alpha channel dropped")
    elif mode in ("L", "1"):
        _note(path, "grayscale image replicated to 3 channels")
    elif mode != "P":
        _note(path, f"{mode} image converted to RGB")
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def _png_bit_depth(path: Path) -> int | None:
    """Bit depth from a PNG header (None for other formats); Pillow reduces 16-bit RGB to its high byte."""
    with open(path, "rb") as handle:
        header = handle.read(25)
    if len(header) < 25 or header[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    return header[24]


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image file as HxWx3 uint8 RGB; a missing or unreadable file raises a one-line SrquantError."""
    path = Path(path)
    if not path.is_file():
        raise SrquantError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode == "RGB" and _png_bit_depth(path) == 16:
                _note(path, "16-bit RGB image reduced to 8 bits")
            return _to_rgb8(img, path)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        reason = str(err).splitlines()[0] if str(err) else "corrupt file"
        raise SrquantError(f"cannot read image {path}: {reason}") from None


def write_image(path: str | os.PathLike[str], img: np.ndarray) -> None:
    """Write an HxWx3 uint8 RGB array (PNG unless the suffix says otherwise), creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 1x3xHxW float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)


def to_uint8(tensor: torch.Tensor) -> np.ndarray:
    """1x3xHxW (or 3xHxW) float in [0, 1] -> HxWx3 uint8, clamped and rounded as the benchmarks do."""
    if tensor.dim() == 4:
        if tensor.shape[0] != 1:
            raise ValueError("to_uint8 takes one image")
        tensor = tensor[0]
    return tensor.detach().clamp(0, 1).mul(255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def list_images(folder: str | os.PathLike[str]) -> list[Path]:
    """Image files directly inside a folder, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SrquantError(f"image folder not found: {folder}")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
