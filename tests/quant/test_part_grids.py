"""Per-part input grids: a fusion conv's concatenated input gets one grid per part, in every method and file."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from srquant import api
from srquant.deploy.onnx_export import conv_params
from srquant.errors import SrquantError
from srquant.methods.pipeline import quantize_model
from srquant.methods.ptq import calibrate
from srquant.models.layout import PER_CHANNEL
from srquant.models.registry import REGISTRY, build_model
from srquant.quant.quantize import quantize_, quantizers
from srquant.quant.quantizers import AsymmetricQuantizer, QuantMode
from srquant.quant.spec import QuantSpec


def _two_parts(batch: int = 3) -> torch.Tensor:
    """A (batch, 4, 5, 5) input whose first two channels lie in [-1, 0] and last two in [0, 10]."""
    gen = torch.Generator().manual_seed(0)
    low = -torch.rand(batch, 2, 5, 5, generator=gen)
    high = 10 * torch.rand(batch, 2, 5, 5, generator=gen)
    return torch.cat([low, high], dim=1)


def test_each_part_is_rounded_on_its_own_grid() -> None:
    x = _two_parts()
    parts = AsymmetricQuantizer(3, rows=2, axis=1)
    parts.set_range(torch.tensor([-1.0, 0.0]), torch.tensor([0.0, 10.0]))
    parts.mode = QuantMode.QUANT
    separate = []
    for lower, upper, piece in ((-1.0, 0.0, x[:, :2]), (0.0, 10.0, x[:, 2:])):
        one = AsymmetricQuantizer(3)
        one.set_range(lower, upper)
        one.mode = QuantMode.QUANT
        with torch.no_grad():
            separate.append(one(piece))
    with torch.no_grad():
        out = parts(x)
    assert torch.equal(out, torch.cat(separate, dim=1))
    assert float((out[:, :2] - x[:, :2]).abs().max()) <= 0.5 / 7 + 1e-6  # the narrow part keeps its fine step
    codes = parts.to_codes(x)
    assert torch.equal(parts.from_codes(codes, x.shape), out)


def test_training_path_matches_the_grid_and_trains_each_part() -> None:
    x = _two_parts()
    q = AsymmetricQuantizer(3, rows=2, axis=1)
    q.set_range(torch.tensor([-0.8, 0.0]), torch.tensor([-0.2, 8.0]))
    q.mode = QuantMode.QUANT
    out = q(x)  # grad enabled: the training path
    with torch.no_grad():
        assert torch.allclose(out, q(x), atol=1e-5)
    out.sum().backward()
    assert q.upper_bound.grad is not None and q.upper_bound.grad.shape == (2,)
    assert bool((q.upper_bound.grad != 0).all())  # both parts clip above their upper bound
    # Each part's bound gets the gradient of its own elements only: the clipped sum above it, plus its step's.
    clipped = [(x[:, :2] > -0.2).sum(), (x[:, 2:] > 8.0).sum()]
    assert all(int(n) > 0 for n in clipped)
    below = q.lower_bound.grad
    assert below is not None and float(below[0]) != float(below[1])


@pytest.mark.parametrize("kind", ["minmax", "dobi", "percentile", "dbdc"])
def test_calibrators_find_each_parts_range(kind: str) -> None:
    x = _two_parts(batch=8)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 2, 1))
    spec = QuantSpec(8, 8, layers=("0",), act_granularity="part")
    layout = REGISTRY["imdn"].layout.__class__(body=("0",), input_parts=(("0", 2),))
    quantize_(model, spec, layout)
    calibrate(model, [x], kind)
    low, high = model[0].input_quantizer.value_range()
    assert low.shape == high.shape == (2,)
    assert float(low[0]) < -0.5 and float(high[0]) <= 0.05  # the negative part
    assert float(low[1]) >= -0.05 and float(high[1]) > 5  # the wide positive part


def test_quantize_gives_only_listed_fusion_convs_part_grids() -> None:
    model = build_model("carn-m", 4, tiny=True).eval()
    quantize_(model, QuantSpec(3, 3, act_granularity="part"), REGISTRY["carn-m"].layout)
    rows = {name: q.rows for name, q in quantizers(model) if name.endswith("input_quantizer")}
    assert rows["b2.c3.body.0.input_quantizer"] == 4 and rows["b2.c1.body.0.input_quantizer"] == 2
    assert rows["b1.c2.body.0.input_quantizer"] == 3 and rows["b1.b1.body.0.input_quantizer"] == 1
    for outer in ("c1", "c2", "c3"):  # the outer cascade's fusion convs: one grid per input channel
        assert rows[f"{outer}.body.0.input_quantizer"] == model.get_submodule(f"{outer}.body.0").in_channels
    plain = build_model("carn-m", 4, tiny=True).eval()
    quantize_(plain, QuantSpec(3, 3), REGISTRY["carn-m"].layout)
    assert all(q.rows == 1 for name, q in quantizers(plain) if name.endswith("input_quantizer"))


def test_spec_refuses_part_grids_for_lsq_and_unknown_values() -> None:
    with pytest.raises(ValueError, match="asymmetric"):
        QuantSpec(4, 4, act_quantizer="lsq", act_granularity="part")
    with pytest.raises(ValueError, match="act_granularity"):
        QuantSpec(4, 4, act_granularity="channel")


@pytest.mark.parametrize("method", ["minmax", "percentile", "dbdc-pac", "dobi", "2dquant", "recon"])
def test_every_fixed_bit_method_runs_with_part_grids(noise_images: Callable[..., Path], method: str) -> None:
    folder = noise_images(3, 64)
    torch.manual_seed(0)
    model = build_model("carn-m", 2, tiny=True).eval()
    small = {
        "minmax": {"calib_count": 4, "calib_size": 8},
        "percentile": {"calib_count": 4, "calib_size": 8},
        "dobi": {"calib_count": 4, "calib_size": 8},
        "dbdc-pac": {"calib_batches": 2, "calib_size": 8, "iterations": 2, "batch_size": 2, "crop": 8},
        "2dquant": {"calib_count": 4, "calib_size": 8, "iterations": 2, "batch_size": 2, "crop": 8},
        "recon": {
            "calib_count": 4,
            "calib_size": 8,
            "iterations": 3,
            "batch_size": 2,
            "e2e_iterations": 2,
            "e2e_batch": 2,
            "e2e_crop": 8,
            "e2e_check_count": 2,
        },
    }[method]
    spec = QuantSpec(3, 3, act_granularity="part")
    result = quantize_model(model, REGISTRY["carn-m"].layout, method, spec, folder, "cpu", **small)
    assert result.report.input_parts["b1.c3.body.0"] == 4
    assert result.report.input_parts["c3.body.0"] == model.get_submodule("c3.body.0").in_channels
    q = model.get_submodule("b1.c3.body.0").input_quantizer
    low, high = q.value_range()
    assert q.mode is QuantMode.QUANT
    # The first part (the entry conv's features, not after a ReLU) goes negative; the units' outputs (after a
    # ReLU) do not, so a per-part calibration gives the first part the lowest lower bound and distinct ranges.
    assert float(low[0]) < float(low[1:].min()) and len({round(float(v), 6) for v in high}) == 4
    with torch.no_grad():
        assert bool(torch.isfinite(model(torch.rand(1, 3, 9, 7))).all())


def test_api_refuses_part_grids_for_dynamic_methods_and_integer_export() -> None:
    with pytest.raises(SrquantError, match="needs a fixed-bit method"):
        api.quantize(build_model("imdn", 2, tiny=True), 2, "adabm", 4, 4, act_granularity="part")
    with pytest.raises(SrquantError, match="one input scale"):
        api.quantize(build_model("imdn", 2, tiny=True), 2, "minmax", 8, 8, act_granularity="part", deploy="onnxruntime")


def test_pipeline_refuses_part_grids_without_listed_concatenations(noise_images: Callable[..., Path]) -> None:
    model = build_model("edsr-baseline", 2, tiny=True).eval()
    with pytest.raises(SrquantError, match="no concatenated inputs"):
        quantize_model(model, REGISTRY["edsr-baseline"].layout, "minmax", QuantSpec(4, 4, act_granularity="part"), ".")
    with pytest.raises(SrquantError, match="fixed-bit method"):
        quantize_model(model, REGISTRY["imdn"].layout, "adabm", QuantSpec(4, 4, act_granularity="part"), ".")


@pytest.mark.parametrize("name", ["imdn", "pan", "carn-m", "lmlt-tiny", "eswt"])
def test_every_listed_fusion_conv_exists_and_gets_its_parts(name: str) -> None:
    model = build_model(name, 4, tiny=True).eval()
    layout = REGISTRY[name].layout
    report = quantize_(model, QuantSpec(4, 4, full=True, act_granularity="part"), layout)
    for pattern, parts in layout.input_parts:
        found = [layer for layer in report.layers if re.fullmatch(pattern, layer)]
        assert found, f"{pattern} matches no quantized layer of {name}"
        for layer in found:
            conv = model.get_submodule(layer)
            expected = conv.in_channels if parts == PER_CHANNEL else parts
            assert report.input_parts[layer] == expected
            assert conv.input_quantizer.rows == expected


def test_integer_export_names_the_part_grid_layer() -> None:
    model = build_model("carn-m", 2, tiny=True).eval()
    quantize_(model, QuantSpec(8, 8, act_granularity="part"), REGISTRY["carn-m"].layout)
    calibrate(model, [torch.rand(2, 3, 12, 12)], "minmax")
    with pytest.raises(SrquantError, match=r"c1\.body\.0: only per-tensor activation grids"):
        conv_params(model)


def test_per_channel_parts_give_each_input_channel_its_own_grid() -> None:
    conv = torch.nn.Sequential(torch.nn.Conv2d(4, 3, 1))
    layout = REGISTRY["imdn"].layout.__class__(body=("0",), input_parts=(("0", PER_CHANNEL),))
    report = quantize_(conv, QuantSpec(3, 3, act_granularity="part"), layout)
    assert report.input_parts["0"] == 4
    calibrate(conv, [_two_parts()], "minmax")
    lower, upper = conv[0].input_quantizer.value_range()
    x = _two_parts()
    assert torch.allclose(lower, x.amin(dim=(0, 2, 3)), atol=1e-6)
    assert torch.allclose(upper, x.amax(dim=(0, 2, 3)), atol=1e-6)


def test_per_channel_parts_refuse_a_linear_layer() -> None:
    layer = torch.nn.Sequential(torch.nn.Linear(4, 3))
    layout = REGISTRY["imdn"].layout.__class__(body=("0",), input_parts=(("0", PER_CHANNEL),))
    with pytest.raises(SrquantError, match="per-channel input grids need a conv"):
        quantize_(layer, QuantSpec(3, 3, act_granularity="part"), layout)
