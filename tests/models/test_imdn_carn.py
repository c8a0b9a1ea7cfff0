"""Tests of the IMDN and CARN-M zoo architectures: shapes, checkpoint compatibility, a real forward pass."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from srquant.models import carn, imdn

TINY = [(imdn.IMDN, imdn.TINY_KWARGS), (carn.CARNM, carn.TINY_KWARGS)]
SCALES = (2, 3, 4)


def _checkpoint(assets: Path, name: str) -> dict[str, torch.Tensor]:
    """Load a shipped checkpoint with the `module.` prefix (IMDN's DataParallel leftover) stripped."""
    state = torch.load(assets / "weights" / name, map_location="cpu", weights_only=True)
    return {key.removeprefix("module."): value for key, value in state.items()}


def _full_model(assets: Path, network: str, scale: int) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Build the pretrained configuration of ``network`` and return it with its checkpoint."""
    if network == "imdn":
        return imdn.IMDN(scale=scale), _checkpoint(assets, f"IMDN_x{scale}.pth")
    return carn.CARNM(scale=scale), _checkpoint(assets, "carn_m.pth")


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize(("cls", "kwargs"), TINY, ids=["imdn", "carn_m"])
@pytest.mark.parametrize("size", [(7, 5), (1, 1)])
def test_tiny_output_shape(cls: type[nn.Module], kwargs: dict, scale: int, size: tuple[int, int]) -> None:
    """A tiny variant maps [B, 3, H, W] to [B, 3, sH, sW] for odd and minimal sizes."""
    torch.manual_seed(0)
    model = cls(scale=scale, **kwargs).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, *size))
    assert out.shape == (2, 3, scale * size[0], scale * size[1])
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(("cls", "kwargs"), TINY, ids=["imdn", "carn_m"])
def test_tiny_contract_attributes(cls: type[nn.Module], kwargs: dict) -> None:
    """The tiny variant is small and has the attributes every zoo model exposes."""
    model = cls(scale=3, **kwargs)
    assert sum(p.numel() for p in model.parameters()) < 10_000
    assert model.scale == 3
    assert model.pad_multiple == 1
    assert model.stage_names
    for name in model.stage_names:
        model.get_submodule(name)


def test_carn_rejects_unsupported_scale() -> None:
    """CARN-M only has upsamplers for x2, x3 and x4."""
    with pytest.raises(ValueError):
        carn.CARNM(scale=8)


@pytest.mark.assets
@pytest.mark.parametrize(("network", "scale"), [("imdn", 2), ("imdn", 3), ("imdn", 4), ("carn_m", 4)])
def test_state_dict_matches_checkpoint(assets: Path, network: str, scale: int) -> None:
    """The full-size model's state-dict keys and shapes equal the checkpoint's, so it loads strictly."""
    model, state = _full_model(assets, network, scale)
    own = model.state_dict()
    assert set(own) == set(state)
    assert {k: tuple(v.shape) for k, v in own.items()} == {k: tuple(v.shape) for k, v in state.items()}
    model.load_state_dict(state, strict=True)


@pytest.mark.assets
@pytest.mark.parametrize("network", ["imdn", "carn_m"])
def test_real_x4_forward_on_set5(assets: Path, network: str) -> None:
    """The pretrained x4 model super-resolves a Set5 image to a finite output close to the ground truth."""
    set5 = assets / "datasets" / "Set5"
    lr = np.asarray(Image.open(set5 / "LR_bicubic" / "X4" / "birdx4.png").convert("RGB"))
    hr = np.asarray(Image.open(set5 / "HR" / "bird.png").convert("RGB"), dtype=np.float64) / 255
    model, state = _full_model(assets, network, 4)
    model.load_state_dict(state, strict=True)
    x = torch.from_numpy(lr.copy()).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        out = model.eval()(x)
    assert out.shape == (1, 3, 4 * lr.shape[0], 4 * lr.shape[1])
    assert torch.isfinite(out).all()
    sr = out.clamp(0, 1)[0].permute(1, 2, 0).double().numpy()
    rgb_psnr = 10 * np.log10(1 / np.mean((sr - hr[: sr.shape[0], : sr.shape[1]]) ** 2))
    assert rgb_psnr > 28, "pretrained weights should give a sharp reconstruction, not noise"
