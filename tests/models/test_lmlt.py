"""Tests for the LMLT architecture: shapes with padding, checkpoint key compatibility, attention hooks."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from srquant.models.lmlt import LMLT, TINY_KWARGS, WindowAttention
from srquant.models.padding import reflect_pad_to

CHECKPOINTS = {2: "LMLT_tiny_x2.pth", 3: "LMLT_tiny_x3_new.pth", 4: "LMLT_tiny_x4_new.pth"}


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("size", [(13, 17), (1, 1), (65, 3)])
def test_tiny_output_shape(scale: int, size: tuple[int, int]) -> None:
    """Odd and tiny inputs are padded internally and cropped back to exactly scale * size."""
    torch.manual_seed(0)
    model = LMLT(**TINY_KWARGS, scale=scale).eval()
    assert model.scale == scale and model.pad_multiple == 64
    assert model.stage_names == ("feats.0", "feats.1")
    with torch.no_grad():
        out = model(torch.rand(2, 3, *size))
    assert out.shape == (2, 3, scale * size[0], scale * size[1])
    assert torch.isfinite(out).all()


def test_padding_matches_single_reflect_when_possible() -> None:
    """Where one reflection suffices, the padding is the original's bottom/right reflect padding."""
    x = torch.rand(1, 3, 40, 57)
    expected = F.pad(x, (0, 7, 0, 24), mode="reflect")
    assert torch.equal(reflect_pad_to(x, 64, 64), expected)
    assert reflect_pad_to(torch.rand(1, 3, 1, 5), 64, 64).shape == (1, 3, 64, 64)


def test_hooks_called_once_per_attention(count_hook_calls) -> None:
    """Each of the four hooks runs exactly once per attention module per forward pass and holds no state."""
    model = LMLT(**TINY_KWARGS, scale=2).eval()
    keys_before = set(model.state_dict())
    counters = count_hook_calls(model, WindowAttention)
    assert len(counters) == TINY_KWARGS["n_blocks"] * 4
    assert set(model.state_dict()) == keys_before
    with torch.no_grad():
        model(torch.rand(1, 3, 13, 17))
    assert [c.calls for hooks in counters for c in hooks.values()] == [1] * 4 * len(counters)


@pytest.mark.assets
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_full_size_keys_match_checkpoint(assets: Path, scale: int) -> None:
    """The Tiny configuration's state-dict keys and shapes equal the released checkpoint's ``params``."""
    path = assets / "weights" / CHECKPOINTS[scale]
    params = torch.load(path, map_location="cpu", weights_only=True)["params"]
    model = LMLT(dim=36, n_blocks=8, ffn_scale=2.0, scale=scale)
    state = model.state_dict()
    assert set(state) == set(params)
    assert all(state[k].shape == params[k].shape for k in params)
    model.load_state_dict(params, strict=True)


def test_level_pooling_equals_the_original_adaptive_pooling() -> None:
    # LHSB pools level l by 2^l with a plain max pool (it exports to ONNX); on the padded feature maps, whose
    # sides divide by 2^(levels-1), that is exactly the original's adaptive pooling to (h / 2^l, w / 2^l).
    import torch.nn.functional as F

    x = torch.randn(2, 3, 24, 40)
    for level in (1, 2, 3):
        size = (24 // 2**level, 40 // 2**level)
        assert torch.equal(F.max_pool2d(x, 2**level), F.adaptive_max_pool2d(x, size))
