"""Tests for the ESWT architecture: shapes with window padding, checkpoint compatibility, attention hooks."""

from pathlib import Path

import pytest
import torch
from torch import nn

from srquant.metrics.complexity import HOOK_NAMES
from srquant.models.eswt import ESWT, TINY_KWARGS, StripedWindowAttention

FULL_KWARGS = {
    "scale": 4,
    "num_in_ch": 3,
    "num_out_ch": 3,
    "task": "lsr",
    "n_t": 6,
    "n_g": 3,
    "dim": 60,
    "num_heads": 1,
    "window_list": ((24, 6), (6, 24)),
    "shift_list": ((12, 3), (3, 12)),
}


def tiny(scale: int = 2) -> ESWT:
    """A randomly initialised tiny ESWT in eval mode."""
    torch.manual_seed(0)
    return ESWT(scale=scale, **TINY_KWARGS).eval()


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("size", [(13, 17), (1, 1), (3, 5), (8, 8)])
def test_tiny_output_shape(scale: int, size: tuple[int, int]) -> None:
    """Any input size (odd, smaller than a window, or a window multiple) gives [B, 3, s*H, s*W]."""
    model = tiny(scale)
    height, width = size
    with torch.no_grad():
        out = model(torch.rand(2, 3, height, width))
    assert out.shape == (2, 3, scale * height, scale * width)
    assert torch.isfinite(out).all()


def test_tiny_contract_attributes() -> None:
    """scale, pad_multiple and stage_names exist and name real modules."""
    model = tiny(3)
    assert model.scale == 3
    assert model.pad_multiple == 4
    modules = dict(model.named_modules())
    assert model.stage_names == ("body.0",)
    assert all(name in modules for name in model.stage_names)
    assert sum(p.numel() for p in model.parameters()) < 20_000


def test_hooks_add_no_state() -> None:
    """The identity hooks are present in every attention module and add no state-dict keys."""
    model = tiny()
    attention = [m for m in model.modules() if isinstance(m, StripedWindowAttention)]
    assert attention
    for module in attention:
        for hook in HOOK_NAMES:
            assert isinstance(getattr(module, hook), nn.Identity)
    assert not any("hook" in key for key in model.state_dict())


def test_each_hook_called_once_per_attention(count_hook_calls) -> None:
    """Every attention module calls each of its four hooks exactly once per forward."""
    model = tiny()
    x = torch.rand(1, 3, 13, 17)
    with torch.no_grad():
        reference = model(x)
    attention = [m for m in model.modules() if isinstance(m, StripedWindowAttention)]
    counters = count_hook_calls(model, StripedWindowAttention)
    with torch.no_grad():
        out = model(x)
    assert torch.equal(out, reference)
    assert len(counters) == len(attention)
    assert all(hooks.keys() == set(HOOK_NAMES) for hooks in counters)
    assert all(counter.calls == 1 for hooks in counters for counter in hooks.values())


def test_hooks_see_operands() -> None:
    """Zeroing the attention map through attn_hook changes the output, so the hook lies on the data path."""
    model = tiny()
    x = torch.rand(1, 3, 9, 10)
    with torch.no_grad():
        reference = model(x)

    class Zero(nn.Module):
        """Replace the tensor by zeros."""

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            """Return zeros like t."""
            return torch.zeros_like(t)

    module = next(m for m in model.modules() if isinstance(m, StripedWindowAttention))
    module.attn_hook = Zero()
    with torch.no_grad():
        assert not torch.allclose(model(x), reference)


def test_full_parameter_count() -> None:
    """The released configuration has 618,612 parameters (frozen shift masks and mean shifts included)."""
    model = ESWT(**FULL_KWARGS)
    assert sum(p.numel() for p in model.parameters()) == 618_612
    assert model.pad_multiple == 24
    assert model.stage_names == ("body.0", "body.1", "body.2")


@pytest.mark.assets
def test_full_state_dict_matches_checkpoint(assets: Path) -> None:
    """The state-dict keys equal the checkpoint's `params` keys and the weights load strictly."""
    path = assets / "weights" / "ESWT-24-6_LSR_x4.pth"
    params = torch.load(path, map_location="cpu", weights_only=True)["params"]
    model = ESWT(**FULL_KWARGS)
    assert set(model.state_dict()) == set(params)
    model.load_state_dict(params, strict=True)
