"""Empirical bias correction: every corrected layer's mean output error vanishes on the calibration crops."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from srquant.errors import SrquantError
from srquant.methods.bias_correction import correct_biases
from srquant.methods.pipeline import quantize_model
from srquant.methods.ptq import calibrate
from srquant.methods.recon import ReconConfig, run_recon
from srquant.methods.training import float_teacher
from srquant.models.registry import REGISTRY, build_model
from srquant.quant.modules import is_quantized
from srquant.quant.quantize import quantize_
from srquant.quant.spec import QuantSpec

pytestmark = pytest.mark.usefixtures("one_thread")


def _crops(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=gen)
    return torch.nn.functional.interpolate(coarse, size=(16, 16), mode="bilinear").clamp(0, 1)


def _mean_errors(
    model: torch.nn.Module, floating: torch.nn.Module, batch: torch.Tensor
) -> dict[str, tuple[float, int]]:
    """Each quantized layer's largest per-channel mean output error against the float copy over all its calls,
    and how many times a forward pass calls it."""
    names = [n for n, m in model.named_modules() if is_quantized(m)]
    outs: dict[tuple[str, str], list[torch.Tensor]] = {}

    def keep(key: tuple[str, str]):  # noqa: ANN202
        return lambda _m, _a, o: outs.setdefault(key, []).append(o.mean(dim=(0, 2, 3)))

    handles = [
        net.get_submodule(n).register_forward_hook(keep((k, n)))
        for k, net in (("q", model), ("f", floating))
        for n in names
    ]
    with torch.no_grad():
        model(batch)
        floating(batch)
    for handle in handles:
        handle.remove()
    ran = [n for n in names if ("q", n) in outs]  # an x2 network never runs its x3 upsampler
    errors = {n: torch.stack(outs["q", n]).mean(0) - torch.stack(outs["f", n]).mean(0) for n in ran}
    return {n: (float(errors[n].abs().max()), len(outs["q", n])) for n in ran}


@pytest.mark.parametrize(("name", "first"), [("imdn", "fea_conv"), ("carn-m", "entry")])
def test_each_layer_mean_error_vanishes_and_the_output_gets_closer(name: str, first: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, 2, tiny=True).eval()
    quantize_(model, QuantSpec(4, 4, full=True), REGISTRY[name].layout)
    batches = list(_crops(16, 0).split(8))
    calibrate(model, batches, "minmax")
    floating = float_teacher(model)
    held_out = _crops(8, 7)
    with torch.no_grad():
        before = (model(held_out) - floating(held_out)).mean(dim=(0, 2, 3)).abs().max()
    uncorrected = _mean_errors(model, floating, torch.cat(batches))
    names = correct_biases(model, batches)
    assert names[0] == first
    errors = _mean_errors(model, floating, torch.cat(batches))
    for layer in names:
        error, calls = errors[layer]
        if calls == 1:
            assert error < 1e-4, layer  # centred exactly
        else:  # a shared unit: centred over its calls, up to what the layers corrected after it move
            assert error < 0.1 * uncorrected[layer][0], layer
    assert name != "carn-m" or any(calls > 1 for _, calls in errors.values())
    with torch.no_grad():
        after = (model(held_out) - floating(held_out)).mean(dim=(0, 2, 3)).abs().max()
    assert after < before  # and the network's colour shift on unseen crops shrinks


def test_after_recon_the_biases_are_centred_on_the_float_network_not_on_the_rounded_one() -> None:
    torch.manual_seed(0)
    model = build_model("imdn", 2, tiny=True).eval()
    quantize_(model, QuantSpec(3, 3), REGISTRY["imdn"].layout)
    batches = list(_crops(16, 0).split(8))
    calibrate(model, batches, "dobi")
    floating = float_teacher(model)
    run_recon(model, batches, ReconConfig(iterations=5, batch_size=4), teacher=floating)
    names = correct_biases(model, batches, reference=floating)
    errors = _mean_errors(model, floating, torch.cat(batches))
    assert names and max(errors[n][0] for n in names) < 1e-4


def test_the_flag_runs_after_the_range_methods_and_is_refused_elsewhere(noise_images: Callable[..., Path]) -> None:
    folder = noise_images(2, 64)

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
