"""Image reading: conversions to 8-bit RGB, and one-line errors for unreadable files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from srquant.data.io import read_image, to_tensor, to_uint8
from srquant.errors import SrquantError


def test_grayscale_is_replicated(tmp_path: Path) -> None:
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    rgb = read_image(tmp_path / "g.png")
    assert rgb.shape == (3, 4, 3) and all(np.array_equal(rgb[..., c], gray) for c in range(3))


def test_alpha_is_dropped(tmp_path: Path) -> None:
    rgba = np.random.default_rng(0).integers(0, 256, (5, 6, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    assert np.array_equal(read_image(tmp_path / "a.png"), rgba[..., :3])


def test_16bit_gray_is_scaled_to_8bit(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.uint16)).save(tmp_path / "d.png")
    assert read_image(tmp_path / "d.png")[0, :, 0].tolist() == [0, 100, 255]


def test_corrupt_and_missing_files_raise_one_line_naming_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    for path in (bad, tmp_path / "absent.png"):
        with pytest.raises(SrquantError) as info:
            read_image(path)
        assert path.name in str(info.value) and "\n" not in str(info.value)


def test_tensor_round_trip() -> None:
    img = np.random.default_rng(1).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    assert np.array_equal(to_uint8(to_tensor(img)), img)


def test_conversion_note_is_shown_once_per_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8), mode="L").save(tmp_path / "gray.png")
    with caplog.at_level("WARNING", logger="srquant.data.io"):
        read_image(tmp_path / "gray.png")
        read_image(tmp_path / "gray.png")
    notes = [r.getMessage() for r in caplog.records]
    assert notes == ["gray.png: grayscale image replicated to 3 channels"]
