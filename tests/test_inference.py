"""Tiled inference agrees with whole-image inference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from srquant.data.imresize import bicubic_downsample
from srquant.data.io import read_image, to_tensor, to_uint8
from srquant.errors import SrquantError
from srquant.metrics.psnr_ssim import psnr_y
from srquant.models.inference import upscale
from srquant.models.registry import build_model, create_model


def test_tiles_equal_whole_image_when_overlap_covers_the_receptive_field() -> None:
    torch.manual_seed(0)
    # Tiny EDSR: 2 residual blocks of 3x3 convs plus head/tail, receptive field radius 7 LR pixels.
    model = build_model("edsr-baseline", 2, tiny=True).eval()
    x = torch.rand(1, 3, 40, 37)
    whole = upscale(model, x)
    tiled = upscale(model, x, tile=32, overlap=16)
    assert whole.shape == tiled.shape
    assert torch.allclose(whole, tiled, atol=1e-5)


@pytest.mark.parametrize("name", ["swinir-light", "lmlt-tiny", "eswt"])
def test_transformer_tiles_cover_the_image(name: str) -> None:
    scale = 4 if name == "eswt" else 2
    model = build_model(name, scale, tiny=True).eval()
    x = torch.rand(1, 3, 30, 27)
    tiled = upscale(model, x, tile=16, overlap=4)
    assert tiled.shape == (1, 3, 30 * scale, 27 * scale) and torch.isfinite(tiled).all()


def test_bad_overlap() -> None:
    model = build_model("imdn", 2, tiny=True).eval()
    with pytest.raises(SrquantError, match="overlap"):
        upscale(model, torch.rand(1, 3, 20, 20), tile=8, overlap=8)


@pytest.mark.parametrize(("name", "tile"), [("pan", 48), ("lmlt-tiny", 64), ("imdn", 48)])
def test_real_network_tiled_close_to_whole(assets: Path, name: str, tile: int) -> None:
    """Close, not equal: attention sees a tile, and IMDN's channel attention pools whole-input statistics."""
    hr = read_image(assets / "datasets" / "Set5" / "HR" / "baby.png")
    lr = bicubic_downsample(hr, 4)
    model = create_model(name, 4, assets=assets)
    whole = to_uint8(upscale(model, to_tensor(lr)))
    tiled = to_uint8(upscale(model, to_tensor(lr), tile=tile, overlap=16))
    assert psnr_y(tiled, whole, 4) > 40
    assert np.abs(tiled.astype(int) - whole.astype(int)).mean() < 1.0
