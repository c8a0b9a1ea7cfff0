"""Quantization core: FP equivalence, near-identity at 16 bits, hand-checked gradients, DOBI, calibration."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from srquant.errors import SrquantError
from srquant.methods.ptq import calibrate
from srquant.models.registry import REGISTRY, build_model
from srquant.quant.calibrators import DobiCalibrator
from srquant.quant.modules import is_quantized
from srquant.quant.quantize import fp_mode, mode_scope, quantize_, quantizers, set_mode
from srquant.quant.quantizers import AsymmetricQuantizer, LSQQuantizer, QuantMode, SymmetricQuantizer
from srquant.quant.spec import QuantSpec

NAMES = ["imdn", "pan", "carn-m", "lmlt-tiny", "eswt", "swinir-light", "edsr-baseline", "rdn", "srresnet"]


def _quantized(name: str, spec: QuantSpec, scale: int = 4) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(name, scale, tiny=True).eval()
    quantize_(model, spec, REGISTRY[name].layout)
    return model


@pytest.mark.parametrize("name", NAMES)
def test_disabled_quantization_equals_float_bit_for_bit(name: str) -> None:
    torch.manual_seed(0)
    reference = build_model(name, 4, tiny=True).eval()
    model = _quantized(name, QuantSpec(4, 4, full=True))
    assert sum(is_quantized(m) for m in model.modules()) > 0
    x = torch.rand(2, 3, 13, 11)
    calibrate(model, [x], "minmax")  # bounds set, quantization on ...
    with torch.no_grad(), fp_mode(model):  # ... and switched off again: the FP teacher
        assert torch.equal(model(x), reference(x))
    # Parameter names of the float model are all still there, unchanged.
    assert set(reference.state_dict()) <= set(model.state_dict())


def test_mode_scope_switches_only_the_chosen_quantizers_and_restores_every_mode() -> None:
    model = _quantized("imdn", QuantSpec(4, 4))
    calibrate(model, [torch.rand(1, 3, 12, 12)], "minmax")
    before = {name: q.mode for name, q in quantizers(model)}
    chosen = [name for name in before if name.endswith("c5.input_quantizer")]
    assert chosen and all(mode is QuantMode.QUANT for mode in before.values())
    with mode_scope(model, QuantMode.FP, lambda name: name in chosen):
        inside = {name: q.mode for name, q in quantizers(model)}
        assert {name for name, mode in inside.items() if mode is QuantMode.FP} == set(chosen)
    assert {name: q.mode for name, q in quantizers(model)} == before


@pytest.mark.parametrize("name", ["imdn", "swinir-light", "eswt"])
def test_16_bit_wide_range_is_near_identity(name: str) -> None:
    model = _quantized(name, QuantSpec(16, 16))
    x = torch.rand(1, 3, 12, 12)
    with torch.no_grad(), fp_mode(model):
        ref = model(x)
    calibrate(model, [x], "minmax")
    with torch.no_grad():
        out = model(x)
    assert (out - ref).abs().max() < 1e-3


def test_asymmetric_forward_and_gradients_match_hand_reference() -> None:
    q = AsymmetricQuantizer(bits=2)
    q.set_range(-1.0, 2.0)  # step 1: grid -1, 0, 1, 2
    q.mode = QuantMode.QUANT
    x = torch.tensor([-3.0, -0.6, 0.4, 1.49, 2.5, 5.0], requires_grad=True)
    y = q(x)
    assert y.tolist() == [-1.0, -1.0, 0.0, 1.0, 2.0, 2.0]
    upstream = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    y.backward(upstream)
    # x: identity inside [l, u] (rounding is straight-through), zero outside.
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 0.0, 0.0]
    # Hand derivation, element by element: s = (u-l)/3, t = (clip(x)-l)/s, q = s*round(t) + l, with
    # round straight-through (d round(t) = d t) and d clip/d l = [x < l], d clip/d u = [x > u].
    lower, upper, levels = -1.0, 2.0, 3
    s = (upper - lower) / levels
    grad_l = grad_u = 0.0
    for xi, g in zip([-3.0, -0.6, 0.4, 1.49, 2.5, 5.0], upstream.tolist(), strict=True):
        c = min(max(xi, lower), upper)
        r = round((c - lower) / s)
        dc_dl, dc_du = (1.0 if xi < lower else 0.0), (1.0 if xi > upper else 0.0)
        ds_dl, ds_du = -1.0 / levels, 1.0 / levels
        # q = r*s + l with r ~ t = (c - l)/s
        dt_dl = ((dc_dl - 1.0) * s - (c - lower) * ds_dl) / s**2
        dt_du = (dc_du * s - (c - lower) * ds_du) / s**2
        grad_l += g * (dt_dl * s + r * ds_dl + 1.0)
        grad_u += g * (dt_du * s + r * ds_du)
    assert q.lower_bound.grad.item() == pytest.approx(grad_l)
    assert q.upper_bound.grad.item() == pytest.approx(grad_u)


def test_clip_gradient_sums_over_clipped_elements() -> None:
    # With the rounding grid aligned, the bound gradient from clipping alone is the SUM over clipped elements.
    from srquant.quant.quantizers import BoundClip

    x = torch.tensor([-5.0, -2.0, 0.0, 3.0, 7.0])
    lower = torch.tensor(-1.0, requires_grad=True)
    upper = torch.tensor(2.0, requires_grad=True)
    BoundClip.apply(x, lower, upper).backward(torch.tensor([1.0, 10.0, 100.0, 1000.0, 10000.0]))
    assert lower.grad.item() == 11.0 and upper.grad.item() == 11000.0


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("align_zero", [False, True])
def test_crossed_bounds_read_the_same_in_training_and_evaluation(rows: int, align_zero: bool) -> None:
    """Bound training can push lower above upper (2DQuant W2A2 on PAN did); the training path (autograd on) and
    the grid of evaluation and export must then agree, or a model that trained well is broken at test time."""
    q = AsymmetricQuantizer(2, rows=rows, align_zero=align_zero)
    q.mode = QuantMode.QUANT
    with torch.no_grad():
        q.lower_bound.fill_(0.4)
        q.upper_bound.fill_(-0.2)
        if rows > 1:
            q.upper_bound[0] = 1.0  # one row ordered, the others crossed
    x = torch.linspace(-1, 1.5, rows * 12).reshape(rows, 12)
    trained = q(x.clone().requires_grad_(True)).detach()
    with torch.no_grad():
        evaluated = q(x)
    torch.testing.assert_close(trained, evaluated)
    lower, upper = q.bounds()
    assert bool((upper > lower).all())


def test_symmetric_and_lsq_grids() -> None:
    sym = SymmetricQuantizer(bits=3)  # levels -3..3 times u/3
    sym.set_range(-1.5, 3.0)
    sym.mode = QuantMode.QUANT
    assert sym(torch.tensor([-4.0, -1.2, 0.4, 2.6])).tolist() == [-3.0, -1.0, 0.0, 3.0]
    lsq = LSQQuantizer(bits=4, signed=False)
    lsq.step.data.fill_(0.5)
    lsq.mode = QuantMode.QUANT
    assert lsq(torch.tensor([-1.0, 0.26, 9.0])).tolist() == [0.0, 0.5, 7.5]


def test_per_sample_bits() -> None:
    q = AsymmetricQuantizer(bits=8)
    q.set_range(0.0, 1.0)
    q.mode = QuantMode.QUANT
    q.bits_override = torch.tensor([1.0, 2.0]).view(2, 1)
    out = q(torch.full((2, 3), 0.4))
    assert out[0].tolist() == [0.0] * 3 and out[1].tolist() == pytest.approx([1 / 3] * 3)


def _dobi(x: torch.Tensor, bits: int, one_sided: bool, static: bool, batches: int = 1) -> tuple[float, float]:
    """DOBI's range for a tensor: exact (a weight, seen once) or from the histogram over batches."""
    q = AsymmetricQuantizer(bits, one_sided=one_sided)
    cal = DobiCalibrator("t", q, static=static)
    for index in range(2):
        cal.begin_pass(index)
        for part in x.chunk(batches):
            cal.collect(part)
    lo, hi = cal.compute()
    return float(lo), float(hi)


def test_dobi_recovers_known_bounds_on_synthetic_tensor() -> None:
    # Uniform values on [-1, 1] plus a few far outliers: at 4 bits the best bounds cut the outliers and keep
    # the bulk, i.e. close to (-1, 1); min/max would be (-8, 8).
    gen = torch.Generator().manual_seed(0)
    bulk = torch.rand(200_000, generator=gen) * 2 - 1
    x = torch.cat([bulk, torch.tensor([-8.0, 8.0])])
    lo, hi = _dobi(x, 4, one_sided=False, static=True)
    assert -1.2 < lo < -0.9 and 0.9 < hi < 1.2
    # The histogram calibrator accumulated over two batches picks (almost) the same candidate.
    hlo, hhi = _dobi(x, 4, one_sided=False, static=False, batches=2)
    step = 16.0 / 200  # the candidate spacing
    assert abs(hlo - lo) <= step + 1e-6 and abs(hhi - hi) <= step + 1e-6


def test_dobi_one_sided_keeps_the_minimum() -> None:
    x = torch.distributions.Exponential(torch.tensor(4.0)).sample((100_000,))
    x = torch.cat([x, torch.tensor([20.0])])
    lo, hi = _dobi(x, 4, one_sided=True, static=True)
    assert lo == pytest.approx(float(x.min())) and hi < 5.0


def test_nan_during_calibration_is_a_clear_error() -> None:
    model = _quantized("imdn", QuantSpec(4, 4))
    x = torch.rand(1, 3, 8, 8)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(SrquantError, match="non-finite values"):
        calibrate(model, [x], "dobi")
    assert all(q.mode is QuantMode.FP for _, q in quantizers(model))  # nothing was switched on


@pytest.mark.parametrize("method", ["minmax", "percentile", "dobi"])
def test_methods_calibrate_every_quantizer(method: str) -> None:
    model = _quantized("swinir-light", QuantSpec(4, 4))
    x = torch.rand(2, 3, 12, 12)
    calibrate(model, [x, x.flip(-1)], method)
    ranges = [q.value_range() for _, q in quantizers(model)]
    assert all(bool((lo < hi).all()) for lo, hi in ranges)
    set_mode(model, QuantMode.QUANT)
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize("name", ["imdn", "pan"])
def test_glue_bits_quantize_the_marked_tensors_between_layers(name: str) -> None:
    spec = QuantSpec(8, 8, full=True, output_bits=8, glue_bits=8)
    torch.manual_seed(0)
    model = build_model(name, 4, tiny=True).eval()
    report = quantize_(model, spec, REGISTRY[name].layout)
    marked = [n for n, m in build_model(name, 4, tiny=True).named_modules() if n.endswith("_glue")]
    assert marked and sorted(report.glue) == sorted(marked)  # every tap, and nothing else
    assert all(isinstance(model.get_submodule(n), AsymmetricQuantizer) for n in marked)
    x = torch.rand(1, 3, 12, 12)
    calibrate(model, [x], "minmax")
    glue = model.get_submodule(marked[0])
    seen: list[torch.Tensor] = []
    handle = glue.register_forward_hook(lambda _m, _a, out: seen.append(out))
    with torch.no_grad():
        model(x)
    handle.remove()
    grid = glue.grid()
    assert grid.integer_zero_point()  # uint8 kernels need an integer zero point (align_zero)
    codes = seen[0] / grid.scale + grid.zero_point
    assert torch.allclose(codes, codes.round(), atol=1e-3)  # the tensor now lies on its 8-bit grid
    assert "glue tensors" in report.summary()


def test_glue_bits_need_output_bits() -> None:
    with pytest.raises(ValueError, match="glue_bits needs output_bits"):
        QuantSpec(8, 8, glue_bits=8)
    with pytest.raises(ValueError, match="glue_bits must be"):
        QuantSpec(8, 8, output_bits=8, glue_bits=1)


def _weight_like(rows: int = 6, gen_seed: int = 0) -> torch.Tensor:
    """A conv weight whose output channels differ in scale by 20x, as trained weights do."""
    gen = torch.Generator().manual_seed(gen_seed)
    scales = torch.logspace(-2, -0.7, rows).view(rows, 1, 1, 1)
    return torch.randn(rows, 4, 3, 3, generator=gen) * scales


KINDS = [
    lambda rows: AsymmetricQuantizer(4, rows),
    lambda rows: SymmetricQuantizer(4, rows),
    lambda rows: LSQQuantizer(4, signed=True, rows=rows),
]


@pytest.mark.parametrize("make", KINDS, ids=["asymmetric", "symmetric", "lsq"])
@pytest.mark.parametrize("rows", [1, 6])
def test_every_quantizer_kind_owns_its_grid_and_codes(make, rows: int) -> None:
    w = _weight_like()
    q = make(rows)
    flat = w.reshape(rows, -1)
    q.set_range(flat.amin(dim=1), flat.amax(dim=1))
    q.mode = QuantMode.QUANT
    grid = q.grid()
    codes = q.to_codes(w)
    assert codes.dtype == torch.int64 and codes.shape == w.shape
    assert int(codes.min()) >= int(grid.qmin) and int(codes.max()) <= int(grid.qmax)
    with torch.no_grad():
        fake = q(w)
        back = q.from_codes(codes, w.shape)
        assert torch.equal(fake, back)  # the model rounds with exactly the grid it exports and packs
        assert torch.equal(q(back), back)  # grid values map to themselves: reloading is bit-identical
    # The range a calibrator proposes and the grid the quantizer then takes agree.
    proposed = q.grid_for(
        flat.amin(dim=1).view(-1, 1) if rows > 1 else flat.amin(),
        flat.amax(dim=1).view(-1, 1) if rows > 1 else flat.amax(),
    )
    assert torch.allclose(proposed.scale, grid.scale) and torch.allclose(proposed.zero_point, grid.zero_point)
    # Gradients flow to every row's parameters in training.
    q.train_quantize(w.requires_grad_()).square().sum().backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in q.parameters())


@pytest.mark.parametrize("make", KINDS, ids=["asymmetric", "symmetric", "lsq"])
def test_per_channel_grids_fit_weights_with_uneven_channels_better(make) -> None:
    w = _weight_like()
    errors = {}
    for rows in (1, 6):
        q = make(rows)
        flat = w.reshape(rows, -1)
        q.set_range(flat.amin(dim=1), flat.amax(dim=1))
        q.mode = QuantMode.QUANT
        with torch.no_grad():
            errors[rows] = float((q(w) - w).square().sum())
    assert errors[6] < 0.5 * errors[1]


@pytest.mark.parametrize(("granularity", "rows"), [("tensor", 3), ("channel", 36)])
def test_weight_granularity_sets_grids_per_channel_or_per_fused_slice(granularity: str, rows: int) -> None:
    model = _quantized("swinir-light", QuantSpec(4, 4, weight_granularity=granularity))
    qkv = next(m for n, m in model.named_modules() if n.endswith("attn.qkv"))
    assert qkv.weight.shape[0] == 36 and qkv.weight_quantizer.rows == rows  # tiny variant: 12 channels x q, k, v
    conv = next(m for n, m in model.named_modules() if n.endswith("mlp.fc1"))
    assert conv.weight_quantizer.rows == (1 if granularity == "tensor" else conv.weight.shape[0])
    x = torch.rand(1, 3, 12, 12)
    calibrate(model, [x], "dobi")
    scale, _ = qkv.weight_quantizer.grid().per_channel(qkv.weight.shape[0])
    assert scale.shape == (36,) and len(set(scale.tolist())) == rows


def test_spec_refuses_an_unknown_granularity() -> None:
    with pytest.raises(ValueError, match="weight_granularity must be one of"):
        QuantSpec(4, 4, weight_granularity="group")


def test_one_bit_symmetric_weights_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 2 bits"):
        QuantSpec(1, 4, weight_quantizer="symmetric")


def test_an_unsigned_lsq_grid_takes_its_step_from_the_upper_end() -> None:
    q = LSQQuantizer(8, signed=False)
    q.set_range(-0.17, 5.0)  # a negative lower end cannot be represented and must not coarsen the step
    assert float(q.grid().scale) == pytest.approx(5.0 / 255)
