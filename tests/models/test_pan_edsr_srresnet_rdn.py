"""Tests of the PAN, EDSR-baseline, SRResNet and RDN zoo architectures: tiny variants, names, sizes."""

from pathlib import Path

import pytest
import torch
from torch import nn

from srquant.models import edsr, pan, rdn, srresnet

ARCHITECTURES = [
    pytest.param(pan, pan.PAN, id="pan"),
    pytest.param(edsr, edsr.EDSR, id="edsr"),
    pytest.param(srresnet, srresnet.SRResNet, id="srresnet"),
    pytest.param(rdn, rdn.RDN, id="rdn"),
]


def _param_count(model: nn.Module) -> int:
    """Number of learnable parameter values in ``model``."""
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize(("module", "cls"), ARCHITECTURES)
def test_tiny_variant_output_shape_and_attributes(module, cls, scale: int) -> None:
    """The tiny variant maps [B, 3, H, W] to [B, 3, sH, sW] and exposes the contract's attributes."""
    torch.manual_seed(0)
    model = cls(scale=scale, **module.TINY_KWARGS).eval()
    assert model.scale == scale
    assert model.pad_multiple == 1
    assert model.stage_names
    for name in model.stage_names:
        model.get_submodule(name)
    assert _param_count(model) < 10_000
    x = torch.rand(2, 3, 7, 5)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 3, 7 * scale, 5 * scale)
    assert torch.isfinite(out).all()


@pytest.mark.assets
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_pan_state_dict_keys_equal_checkpoint(assets: Path, scale: int) -> None:
    """Full-size PAN has exactly the released checkpoint's keys and shapes, and loads it strictly."""
    path = assets / "weights" / f"PANx{scale}_DF2K.pth"
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = pan.PAN(3, 3, nf=40, unf=24, nb=16, scale=scale)
    own = model.state_dict()
    assert list(own) == list(state)
    assert {k: v.shape for k, v in own.items()} == {k: v.shape for k, v in state.items()}
    model.load_state_dict(state, strict=True)


@pytest.mark.parametrize(
    ("scale", "expected"),
    # EDSR-PyTorch's README lists EDSR_baseline at 1.37 M (x2), 1.55 M (x3), 1.52 M (x4) parameters.
    [(2, 1_369_859), (3, 1_554_499), (4, 1_517_571)],
)
def test_edsr_baseline_parameter_count(scale: int, expected: int) -> None:
    """Full-size EDSR-baseline has the published parameter count; the mean shifts are 24 buffer values."""
    model = edsr.EDSR(scale=scale)
    assert _param_count(model) == expected
    assert sum(b.numel() for b in model.buffers()) == 24


def test_edsr_baseline_x4_key_names() -> None:
    """EDSR-baseline x4 carries the key names of the official ``edsr_baseline_x4-6b446fab.pt``."""
    keys = set(edsr.EDSR(scale=4).state_dict())
    expected = {
        "sub_mean.weight",
        "sub_mean.bias",
        "add_mean.weight",
        "add_mean.bias",
        "head.0.weight",
        "head.0.bias",
        "body.0.body.0.weight",
        "body.15.body.2.bias",
        "body.16.weight",
        "tail.0.0.weight",
        "tail.0.2.weight",
        "tail.1.bias",
    }
    assert expected <= keys
    assert len(keys) == 4 + 2 + 16 * 4 + 2 + 4 + 2


def test_edsr_mean_shift_round_trip() -> None:
    """The input and output mean shifts cancel, and map [0, 1] input onto the [0, 255] training range."""
    model = edsr.EDSR(scale=2, **edsr.TINY_KWARGS)
    x = torch.rand(1, 3, 4, 4) * 255
    assert torch.allclose(model.add_mean(model.sub_mean(x)), x, atol=1e-4)
    mean = torch.tensor(edsr.DIV2K_RGB_MEAN).view(1, 3, 1, 1) * 255
    assert torch.allclose(model.sub_mean(x), x - mean, atol=1e-4)


def test_srresnet_full_size_structure() -> None:
    """Full-size SRResNet x4: batch norm in every block, bias-free convs, 9x9 head and tail, known size."""
    model = srresnet.SRResNet(scale=4)
    keys = set(model.state_dict())
    assert {"body.0.bn1.running_mean", "body.15.bn2.weight", "body.15.act.weight"} <= keys
    assert {"body.16.weight", "body.17.running_var"} <= keys
    assert {"head.1.weight", "tail.0.2.weight", "tail.0.5.weight"} <= keys
    assert not any(k.endswith(".bias") and "bn" not in k and not k.startswith("body.17") for k in keys)
    assert model.head[0].kernel_size == (9, 9) and model.tail[1].kernel_size == (9, 9)
    assert _param_count(model) == 1_546_771


def test_rdn_full_size_structure() -> None:
    """Full-size RDN (G0=64, config B) x4 has 16 blocks of 8 dense layers and about 22.3 M parameters."""
    model = rdn.RDN(scale=4)
    keys = set(model.state_dict())
    assert {"SFENet1.weight", "RDBs.15.convs.7.conv.0.weight", "RDBs.15.LFF.bias", "GFF.1.weight"} <= keys
    assert {"UPNet.0.weight", "UPNet.2.weight", "UPNet.4.bias"} <= keys
    assert len(model.stage_names) == 16
    assert _param_count(model) == 22_271_107


def test_pan_upsampling_order_equals_the_released_one() -> None:
    """act(x) * gate (for integer inference) against the released act(x * gate): equal up to float rounding."""
    torch.manual_seed(0)
    model = pan.PAN(scale=4, **pan.TINY_KWARGS).eval()
    feat = torch.randn(1, pan.TINY_KWARGS["nf"], 6, 5) * 3
    with torch.no_grad():
        x = model.upconv1(nn.functional.interpolate(feat, scale_factor=2, mode="nearest"))
        released = model.act(model.HRconv1(model.act(model.att1(x))))
        ours = model._upsample(feat, 2, stage=1)
    assert (x < 0).any()  # the negative side, where the order could matter, is exercised
    torch.testing.assert_close(ours, released, rtol=1e-6, atol=1e-6)
