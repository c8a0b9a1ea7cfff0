"""Tests for SwinIR: padding and shapes, parameter counts, checkpoint keys and attention hooks."""

import pytest
import torch

from srquant.metrics.complexity import HOOK_NAMES
from srquant.models.swinir import (
    TINY_KWARGS,
    SwinIR,
    WindowAttention,
    pad_like_official_test,
    shifted_window_mask,
)


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("size", [(13, 17), (1, 1), (9, 4), (16, 16)])
def test_tiny_output_shape(scale: int, size: tuple[int, int]) -> None:
    """Odd and tiny inputs are padded internally and cropped back to exactly scale * size."""
    torch.manual_seed(0)
    model = SwinIR(scale=scale, **TINY_KWARGS).eval()
    assert model.scale == scale and model.pad_multiple == 4
    assert model.stage_names == ("layers.0", "layers.1")
    with torch.no_grad():
        out = model(torch.rand(2, 3, *size))
    assert out.shape == (2, 3, scale * size[0], scale * size[1])
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("length", [1, 3, 7, 8, 13, 16])
def test_padding_matches_official_test(length: int) -> None:
    """Padding mirrors (edge included) by 1..window pixels, exactly like main_test_swinir where that works."""
    window = 8
    x = torch.rand(1, 3, length, length + 2)
    padded = pad_like_official_test(x, window)
    target_h = (length // window + 1) * window
    target_w = ((length + 2) // window + 1) * window
    assert padded.shape[-2:] == (target_h, target_w)
    assert torch.equal(padded[..., :length, : length + 2], x)
    if 2 * length >= target_h:
        official = torch.cat([x, x.flip(2)], 2)[:, :, :target_h, :]
        official = torch.cat([official, official.flip(3)], 3)[:, :, :, :target_w]
        assert torch.equal(padded, official)


@pytest.mark.parametrize(
    ("scale", "total", "without_bias_tables"),
    [(2, 910_152, 877_752), (3, 918_267, 885_867), (4, 929_628, 897_228)],
)
def test_lightweight_parameter_count(scale: int, total: int, without_bias_tables: int) -> None:
    """Counts match the official definition; without the bias tables they are the paper's 878K/886K/897K.

    897,228 float32 parameters are 3.42 MiB, the size 2DQuant's Table 1 gives for SwinIR-light x4.
    """
    model = SwinIR(scale=scale)
    tables = sum(p.numel() for n, p in model.named_parameters() if n.endswith("relative_position_bias_table"))
    assert sum(p.numel() for p in model.parameters()) == total
    assert total - tables == without_bias_tables


def test_lightweight_state_dict_keys() -> None:
    """Keys and buffer shapes are those of the released 002_lightweightSR_DIV2K_s64w8_SwinIR-S_x4.pth."""
    state = SwinIR(scale=4).state_dict()
    assert len(state) == 366
    assert "mean" not in state
    assert state["upsample.0.weight"].shape == (48, 60, 3, 3)
    assert state["patch_embed.norm.weight"].shape == (60,)
    block = "layers.3.residual_group.blocks.5."
    assert state[block + "attn.relative_position_bias_table"].shape == (225, 6)
    assert state[block + "attn.relative_position_index"].shape == (64, 64)
    assert state[block + "attn.qkv.weight"].shape == (180, 60)
    assert state[block + "mlp.fc1.weight"].shape == (120, 60)
    assert state["layers.3.conv.weight"].shape == (60, 60, 3, 3)
    masks = {k for k in state if k.endswith("attn_mask")}
    assert masks == {f"layers.{i}.residual_group.blocks.{j}.attn_mask" for i in range(4) for j in (1, 3, 5)}
    assert state["layers.0.residual_group.blocks.1.attn_mask"].shape == (64, 64, 64)
    assert sum(k.endswith("relative_position_index") for k in state) == 24
    for key in ("conv_first.weight", "norm.bias", "conv_after_body.bias", "layers.0.conv.bias"):
        assert key in state


def test_stored_mask_equals_runtime_mask() -> None:
    """The checkpoint's mask for the 64x64 crop is the one computed for other sizes, so both paths agree."""
    stored = SwinIR(scale=2).state_dict()["layers.0.residual_group.blocks.1.attn_mask"]
    assert torch.equal(stored, shifted_window_mask(64, 64, 8, 4))
    assert set(stored.unique().tolist()) == {0.0, -100.0}


def test_hooks_called_once_per_attention(count_hook_calls) -> None:
    """Each of the four hooks runs exactly once per attention module per forward pass."""
    torch.manual_seed(0)
    model = SwinIR(scale=2, **TINY_KWARGS).eval()
    keys_before = set(model.state_dict())
    counters = count_hook_calls(model, WindowAttention)  # also checks each hook was an nn.Identity
    assert len(counters) == sum(TINY_KWARGS["depths"])
    assert set(model.state_dict()) == keys_before
    with torch.no_grad():
        model(torch.rand(1, 3, 11, 6))
        model(torch.rand(2, 3, 12, 12))
    for hooks in counters:
        assert [hooks[name].calls for name in HOOK_NAMES] == [2, 2, 2, 2]


def test_state_dict_round_trip() -> None:
    """A saved state dict loads strictly into a fresh instance and reproduces the output exactly."""
    torch.manual_seed(0)
    source = SwinIR(scale=3, **TINY_KWARGS).eval()
    torch.manual_seed(1)
    target = SwinIR(scale=3, **TINY_KWARGS).eval()
    target.load_state_dict(source.state_dict(), strict=True)
    x = torch.rand(1, 3, 10, 7)
    with torch.no_grad():
        assert torch.equal(source(x), target(x))
