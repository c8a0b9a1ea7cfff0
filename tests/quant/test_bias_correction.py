"""Empirical bias correction: every corrected layer's mean output error vanishes on the calibration crops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from srquant.errors import SrquantError
from srquant.methods.bias_correction import correct_biases
from srquant.methods.pipeline import quantize_model
from srquant.methods.ptq import calibrate
from srquant.methods.training import execution_order, float_teacher
from srquant.models.registry import REGISTRY, build_model
from srquant.quant.modules import is_quantized
from srquant.quant.quantize import quantize_
from srquant.quant.spec import QuantSpec

pytestmark = pytest.mark.usefixtures("one_thread")


def _crops(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=gen)
    return torch.nn.functional.interpolate(coarse, size=(16, 16), mode="bilinear").clamp(0, 1)


def _mean_errors(model: torch.nn.Module, floating: torch.nn.Module, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each quantized layer's per-channel mean output error against the same layer of the float copy."""
    names = [n for n, m in model.named_modules() if is_quantized(m)]
    outs: dict[tuple[str, str], torch.Tensor] = {}
    handles = [
        net.get_submodule(n).register_forward_hook(lambda _m, _a, o, k=(key, n): outs.__setitem__(k, o))
        for key, net in (("q", model), ("f", floating))
        for n in names
    ]
    with torch.no_grad():
        model(batch)
        floating(batch)
    for handle in handles:
        handle.remove()
    return {n: (outs["q", n] - outs["f", n]).mean(dim=(0, 2, 3)) for n in names}


def test_each_layer_mean_error_vanishes_and_the_output_gets_closer() -> None:
    torch.manual_seed(0)
    model = build_model("imdn", 2, tiny=True).eval()
    quantize_(model, QuantSpec(4, 4, full=True), REGISTRY["imdn"].layout)
    batches = list(_crops(16, 0).split(8))
    calibrate(model, batches, "minmax")
    floating = float_teacher(model)
    held_out = _crops(8, 7)
    with torch.no_grad():
        before = (model(held_out) - floating(held_out)).mean(dim=(0, 2, 3)).abs().max()
    names = correct_biases(model, batches)
    assert names == execution_order(model, names, batches[0][:1]) and "fea_conv" in names
    errors = _mean_errors(model, floating, torch.cat(batches))
    assert max(float(errors[n].abs().max()) for n in names) < 1e-4  # every layer, in order, centred
    with torch.no_grad():
        after = (model(held_out) - floating(held_out)).mean(dim=(0, 2, 3)).abs().max()
    assert after < before  # and the network's colour shift on unseen crops shrinks


def test_the_flag_runs_after_the_range_methods_and_is_refused_elsewhere(tmp_path: Path) -> None:
    folder = tmp_path / "train"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")

    def run(method: str, **overrides: object):  # noqa: ANN202
        model = build_model("imdn", 2, tiny=True).eval()
        layout = REGISTRY["imdn"].layout
        return quantize_model(
            model, layout, method, QuantSpec(8, 8), folder, "cpu", calib_count=4, calib_size=8, **overrides
        )

    result = run("minmax", bias_correction=True)
    assert result.settings["bias_corrected"] > 0
    assert "bias_corrected" not in run("minmax").settings
    with pytest.raises(SrquantError, match="bias_correction does not apply to 2dquant"):
        run("2dquant", bias_correction=True, iterations=1)
