"""Image reading and writing: every image becomes HxWx3 uint8 RGB, with a note when it had to be converted."""

from __future__ import annotations

import logging
import os
import struct
import warnings
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from srquant.errors import SrquantError
from srquant.outputs import atomic_write

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


@contextmanager
def _opened(path: Path) -> Iterator[Image.Image]:
    """An open image; a missing, unreadable or oversized one (a decompression bomb) raises one line."""
    if not path.is_file():
        raise SrquantError(f"image not found: {path}" if not path.is_dir() else f"{path} is a folder, not an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                yield img
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise SrquantError(
            f"{path} has more than {Image.MAX_IMAGE_PIXELS:,} pixels, the most srquant reads from one image "
            "(a decompression bomb, or an image to split first)"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        reason = str(err).splitlines()[0] if str(err) else "corrupt file"
        raise SrquantError(f"cannot read image {path}: {reason}") from None


def image_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(width, height) of an image file, read from its header only."""
    with _opened(Path(path)) as img:
        return img.size


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image file as HxWx3 uint8 RGB; a missing or unreadable file raises a one-line SrquantError."""
    path = Path(path)
    with _opened(path) as img:
        try:
            img.load()
        except (OSError, ValueError, SyntaxError) as err:
            reason = str(err).splitlines()[0] if str(err) else "corrupt file"
            raise SrquantError(f"cannot read image {path}: {reason}") from None
        if img.mode == "RGB" and _png_bit_depth(path) == 16:
            _note(path, "16-bit RGB image reduced to 8 bits")
        return _to_rgb8(img, path)


def write_image(path: str | os.PathLike[str], img: np.ndarray) -> None:
    """Write an HxWx3 uint8 RGB array atomically (the format follows the suffix), creating parent folders."""
    picture = Image.fromarray(img)
    atomic_write(path, picture.save)


def write_png_strips(
    path: str | os.PathLike[str], height: int, width: int, strips: Iterable[np.ndarray], level: int = 6
) -> None:
    """Write an RGB PNG from HxWx3 uint8 strips given top to bottom, without holding the whole image: the rows
    are filtered (Sub) and compressed as they come, and the file is written atomically."""

    def chunk(out: BinaryIO, kind: bytes, data: bytes) -> None:
        out.write(struct.pack(">I", len(data)) + kind + data)
        out.write(struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    def write(tmp: Path) -> None:
        rows = 0
        with open(tmp, "wb") as out:
            out.write(b"\x89PNG\r\n\x1a\n")
            chunk(out, b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            packer = zlib.compressobj(level)
            for strip in strips:
                if strip.ndim != 3 or strip.shape[1:] != (width, 3) or strip.dtype != np.uint8:
                    raise SrquantError(f"a PNG strip must be Nx{width}x3 uint8, got {strip.shape} {strip.dtype}")
                flat = strip.reshape(strip.shape[0], width * 3)
                filtered = flat.copy()
                filtered[:, 3:] = flat[:, 3:] - flat[:, :-3]  # PNG filter 1 (Sub), modulo 256
                lines = np.concatenate([np.ones((flat.shape[0], 1), np.uint8), filtered], axis=1)
                data = packer.compress(lines.tobytes())
                if data:
                    chunk(out, b"IDAT", data)
                rows += strip.shape[0]
            chunk(out, b"IDAT", packer.flush())
            chunk(out, b"IEND", b"")
        if rows != height:
            raise SrquantError(f"PNG strips gave {rows} rows, expected {height}")

    atomic_write(path, write)


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 1x3xHxW float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)


def to_uint8(tensor: torch.Tensor, in_place: bool = False) -> np.ndarray:
    """1x3xHxW (or 3xHxW) float in [0, 1] -> HxWx3 uint8, clamped and rounded as the benchmarks do; `in_place`
    reuses the tensor's memory for the intermediate steps (for large strips that are not needed afterwards)."""
    if tensor.dim() == 4:
        if tensor.shape[0] != 1:
            raise ValueError("to_uint8 takes one image")
        tensor = tensor[0]
    tensor = tensor.detach()
    scaled = tensor.clamp_(0, 1).mul_(255.0).round_() if in_place else tensor.clamp(0, 1).mul(255.0).round()
    return scaled.to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def list_images(folder: str | os.PathLike[str]) -> list[Path]:
    """Image files directly inside a folder, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SrquantError(f"image folder not found: {folder}")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
