"""AdaBM on tiny models: adaptive bits (values and gradients), Image2Bit, Layer2Bit, BaC, guard, determinism,
ablation switches (and their survival through a checkpoint)."""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from srquant.errors import SrquantError
from srquant.methods.adabm import (
    ADABM,
    ADABM_PRESETS,
    AdaBMConfig,
    AdaptiveBitsModel,
    BitController,
    bit_aware_clipping,
    bit_report,
    calibrate_adabm,
    image_complexity,
    run_adabm,
)
from srquant.methods.adabm.allocation import best_offsets, measured_allocation, one_bit_steps
from srquant.methods.pipeline import load_quantized, save_quantized
from srquant.metrics.complexity import bitops
from srquant.models.registry import REGISTRY, build_model
from srquant.quant.accounting import ops_report
from srquant.quant.calibrators import range_errors
from srquant.quant.quantize import fp_mode, quantize_
from srquant.quant.quantizers import AsymmetricQuantizer, QuantMode
from srquant.quant.spec import QuantSpec, matches

pytestmark = pytest.mark.usefixtures("one_thread")


SMALL = AdaBMConfig(epochs=3, iterations=3, batch_size=2, crop=16, calib_count=8, calib_batch=4, guard_seed_batches=4)


def _smooth(n: int, size: int = 16, gen: torch.Generator | None = None) -> torch.Tensor:
    """Low-frequency random crops (upsampled 4x4 noise) plus a little texture: a spread of complexities."""
    base = F.interpolate(torch.rand(n, 3, 4, 4, generator=gen), size=(size, size), mode="bilinear")
    amount = torch.rand(n, 1, 1, 1, generator=gen) * 0.2
    return (base + amount * (torch.rand(n, 3, size, size, generator=gen) - 0.5)).clamp(0, 1)


def _sampler(seed: int = 0, size: int = 16):
    gen = torch.Generator().manual_seed(seed)
    return lambda n: _smooth(n, size, gen)


def _run(
    name: str = "imdn", config: AdaBMConfig = SMALL, seed: int = 0, sampler=None, full: bool = False, **spec: object
):
    """(the model to evaluate: network + controller, the run) of AdaBM on a tiny x2 network at base W4A4."""
    torch.manual_seed(seed)
    network = build_model(name, 2, tiny=True).eval()
    result = run_adabm(
        network, REGISTRY[name].layout, QuantSpec(4, 4, full=full, **spec), sampler or _sampler(seed), config
    )
    return result.model, result


def _calibrated(name: str = "imdn", layer_range: int = 1) -> tuple[AdaptiveBitsModel, BitController]:
    """A tiny model quantized W4A4, calibrated by AdaBM's statistics, run with its controller."""
    torch.manual_seed(0)
    network = build_model(name, 2, tiny=True).eval()
    layout = REGISTRY[name].layout
    report = quantize_(network, QuantSpec(4, 4, weight_quantizer="symmetric", matmul=False), layout)
    controller = BitController([n for n in report.layers if matches(n, layout.body)], 4, layer_range=layer_range)
    gen = torch.Generator().manual_seed(0)
    calibrate_adabm(network, controller, [_smooth(8, gen=gen) for _ in range(2)], SMALL)
    return AdaptiveBitsModel(network, controller), controller


def test_bits_are_hard_forward_and_gradients_reach_thresholds_and_measures() -> None:
    model, controller = _calibrated()
    x = torch.cat([torch.zeros(1, 3, 16, 16) + 0.5, torch.rand(1, 3, 16, 16), _smooth(2)])
    bits = controller(x)
    assert torch.equal(bits, bits.round()) and bits.min() >= 2 and bits.max() <= 6
    seen: list[torch.Tensor] = []
    q = model.network.get_submodule(controller.layer_names[0]).input_quantizer
    handle = q.register_forward_pre_hook(lambda quantizer, _args: seen.append(quantizer.bits_override.clone()))
    model(x).abs().mean().backward()
    handle.remove()
    assert q.mode is QuantMode.QUANT and torch.equal(seen[0].flatten(), bits[:, 0].detach())
    assert q.bits_override is None  # the per-sample bits live only for the forward pass
    assert controller.measure_layer.grad is not None and controller.measure_layer.grad.abs().sum() > 0
    img_grad = controller.measure_l.grad.abs() + controller.measure_u.grad.abs()
    assert img_grad > 0


def test_image2bit_flat_is_minus_one_and_noise_is_plus_one() -> None:
    _, controller = _calibrated()
    assert 0 < controller.measure_l < controller.measure_u
    flat = torch.full((1, 3, 16, 16), 0.4)
    noisy = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    assert image_complexity(flat).item() < 1e-3  # float rounding only
    assert controller.image_bits(flat).item() == -1 and controller.image_bits(noisy).item() == 1


def test_layer2bit_gives_bottom_30_percent_minus_one_and_top_30_percent_plus_one() -> None:
    _, controller = _calibrated()
    n = len(controller.layer_names)
    assert n == 10  # tiny IMDN: 2 blocks x 5 convs
    order = controller.sensitivity.argsort()
    measures = controller.measure_layer.detach()[order]
    assert measures.tolist() == [-1.0] * 3 + [0.0] * 4 + [1.0] * 3


def test_bit_aware_clipping_changes_bounds() -> None:
    model, controller = _calibrated()
    qs = [model.network.get_submodule(n).input_quantizer for n in controller.layer_names]
    before = [(q.lower_bound.item(), q.upper_bound.item()) for q in qs]
    bit_aware_clipping(model, _smooth(2), SMALL)
    after = [(q.lower_bound.item(), q.upper_bound.item()) for q in qs]
    assert after != before
    assert all(a[1] - a[0] <= b[1] - b[0] + 1e-6 for a, b in zip(after, before, strict=True))  # ranges only shrink


def test_run_trains_in_phases_and_reports_fab_and_bitops() -> None:
    model, result = _run()
    assert result.phases == ["weight"] * 3 + ["activation"] * 3 + ["bit"] * 3 and not result.rollbacks
    assert not model.training and all(math.isfinite(v) for v in result.losses)
    x = _smooth(3)
    report = bit_report(result.controller, x)
    assert set(report.per_layer) == set(result.adaptive_layers)
    values = [b for bits in report.per_layer.values() for b in bits]
    assert all(2 <= b <= 6 for b in values)
    assert report.fab == pytest.approx(sum(values) / len(values))
    single = x[:1]
    bits = model.layer_bits_for(single)
    one = bit_report(result.controller, single)
    assert all(bits[name][1] == one.per_layer[name][0] for name in result.adaptive_layers)
    ops = ops_report(model.network, 2, (16, 16))
    assert bitops(ops, bits) > 0
    metrics = model.image_metrics(single)
    assert metrics["fab"] == pytest.approx(one.fab) and metrics["bitops_g"] > 0
    assert not any("measure" in k for k in model.network.state_dict())  # bit state is the method's, not the network's
    state = result.controller.state_dict()
    fresh = BitController(result.adaptive_layers, 4)
    fresh.load_state_dict(state)
    assert torch.equal(fresh(x), result.controller(x))


def test_same_seed_gives_identical_bits_and_outputs() -> None:
    model_a, result_a = _run(seed=1)
    model_b, result_b = _run(seed=1)
    x = _smooth(2, gen=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(model_a(x), model_b(x))
    assert bit_report(result_a.controller, x).per_layer == bit_report(result_b.controller, x).per_layer
    assert result_a.losses == result_b.losses


def test_weight_bound_blow_up_is_rolled_back_to_a_usable_model() -> None:
    config = dataclasses.replace(SMALL, epochs=1, iterations=8, lr_w=1e6, max_rollbacks=3)
    model, result = _run(config=config)
    assert result.rollbacks and "restored, lr halved" in result.rollbacks[0]
    x = _smooth(2, gen=torch.Generator().manual_seed(7))
    with torch.no_grad():
        out = model(x)
        with fp_mode(model):
            ref = model(x)
    assert torch.isfinite(out).all()
    assert F.l1_loss(out, ref) < 0.5 * ref.abs().mean()


def test_nan_loss_is_rolled_back_and_recorded() -> None:
    inputs = _sampler()
    calls = {"n": 0}

    def poisoned(n: int) -> torch.Tensor:
        calls["n"] += 1
        batch = inputs(n)
        if calls["n"] in (6, 7):  # after 2 calibration batches and the BaC batch: fine-tuning steps 3 and 4
            batch[0, 0, 0, 0] = float("nan")
        return batch

    model, result = _run(config=dataclasses.replace(SMALL, epochs=1, iterations=6), sampler=poisoned)
    assert len(result.rollbacks) == 2 and "restored" in result.rollbacks[0]
    assert all(torch.isfinite(p).all() for p in model.parameters())  # network, quantizers and controller


def test_config_validation_and_presets() -> None:
    assert ADABM_PRESETS["paper"].epochs * ADABM_PRESETS["paper"].iterations == 500
    assert ADABM.config("cpu", {"epochs": 2}).epochs == 2
    with pytest.raises(SrquantError):
        AdaBMConfig(lr_w=0)
    with pytest.raises(SrquantError, match="no preset 'nope'"):
        ADABM.config("nope")
    with pytest.raises(SrquantError, match="percentile does not apply to adabm"):
        ADABM.config("cpu", {"percentile": 99.9})
    with pytest.raises(SrquantError):
        run_adabm(build_model("imdn", 2, tiny=True), REGISTRY["imdn"].layout, QuantSpec(4, 2), _sampler(), SMALL)


def test_bac_candidate_errors_match_a_hand_computed_quantizer_error() -> None:
    x = torch.randn(500, generator=torch.Generator().manual_seed(0))
    scales = 1 - 0.01 * torch.arange(100, dtype=torch.float64)
    errors = range_errors(AsymmetricQuantizer(3), x[None, :], -2.0 * scales[None, :], 3.0 * scales[None, :], bits=3)
    expected = []
    for s in scales.tolist():
        lo, hi = -2.0 * s, 3.0 * s
        step = (hi - lo) / 7
        q = torch.round((x.double().clamp(lo, hi) - lo) / step) * step + lo
        expected.append(float(((x.double() - q) ** 2).sum()))
    assert errors[0].tolist() == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_batchnorm_statistics_never_change_and_the_model_stays_in_eval_mode() -> None:
    torch.manual_seed(0)
    model = build_model("srresnet", 2, tiny=True).eval()
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    result = run_adabm(model, REGISTRY["srresnet"].layout, QuantSpec(4, 4), _sampler(), SMALL)
    assert not model.training and result.losses
    after = model.state_dict()
    assert stats and all(torch.equal(after[k], v) for k, v in stats.items())


def test_full_mode_fixes_head_and_tail_at_w8a8_and_unused_branches_stay_fp() -> None:
    model, result = _run("carn-m", config=dataclasses.replace(SMALL, epochs=1, iterations=2), full=True)
    fixed = {n: b for n, b in result.report.layers.items() if n not in result.adaptive_layers}
    assert fixed and all(b == (8, 8) for b in fixed.values())
    unused = model.network.get_submodule("upsample.up3.body.0").input_quantizer
    assert unused.mode is QuantMode.FP  # the x3 branch of the multi-scale upsampler never runs at x2
    with torch.no_grad():
        assert torch.isfinite(model(_smooth(1))).all()


FLAT = torch.full((1, 3, 16, 16), 0.4)
BUSY = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))  # far above any calibrated threshold


def _controller_params(controller: BitController) -> list[torch.Tensor]:
    """Copies of the controller's thresholds and layer measures."""
    return [p.detach().clone() for p in controller.parameters()]


def test_image2bit_off_gives_every_image_the_same_zero_image_bit_and_never_trains_thresholds() -> None:
    _, result = _run(config=dataclasses.replace(SMALL, image2bit=False))
    controller = result.controller
    assert image_complexity(BUSY) > 100 * image_complexity(FLAT).clamp_min(1e-3)
    assert controller.image_bits(FLAT).item() == controller.image_bits(BUSY).item() == 0
    assert bit_report(controller, FLAT).per_layer == bit_report(controller, BUSY).per_layer
    assert (controller.measure_l.item(), controller.measure_u.item()) == (0.0, 1.0)  # neither calibrated nor trained
    assert controller.measure_l.grad is None and controller.measure_u.grad is None
    assert set(controller.measure_layer.detach().tolist()) != {0.0}  # Layer2Bit still calibrated
    assert result.phases.count("bit") == 3  # the layer measures are still trained in the bit phase


def test_layer2bit_off_gives_every_layer_the_same_bit_for_an_image() -> None:
    _, result = _run(config=dataclasses.replace(SMALL, layer2bit=False))
    controller = result.controller
    assert torch.equal(controller.measure_layer.detach(), torch.zeros(len(controller.layer_names)))
    assert controller.measure_layer.grad is None
    assert controller.sensitivity.abs().sum() > 0  # sensitivities are still recorded
    for x in (FLAT, BUSY):
        bits = controller(x)
        assert torch.equal(bits, torch.full_like(bits, 4 + controller.image_bits(x).item()))
    assert controller(FLAT)[0, 0] < controller(BUSY)[0, 0]  # Image2Bit still adapts


def test_both_off_is_fixed_bit_at_the_base_with_the_same_weight_and_activation_fine_tuning() -> None:
    config = dataclasses.replace(SMALL, epochs=6, image2bit=False, layer2bit=False)
    model, result = _run(config=config)
    controller = result.controller
    fresh = BitController(controller.layer_names, 4)
    assert all(
        torch.equal(a, b) for a, b in zip(_controller_params(controller), _controller_params(fresh), strict=True)
    )
    assert all(p.grad is None for p in controller.parameters())
    assert result.phases == (["weight"] * 3 + ["activation"] * 3) * 2  # bit phases take no step
    assert all(math.isfinite(v) for v in result.losses)
    for x in (FLAT, BUSY, _smooth(3)):
        report = bit_report(controller, x)
        assert report.fab == 4.0 and all(b == 4 for bits in report.per_layer.values() for b in bits)
    bits = model.layer_bits_for(BUSY)
    assert all(bits[name] == (4, 4) for name in controller.layer_names)


def test_both_off_bit_phase_keeps_the_data_stream_of_the_full_schedule() -> None:
    draws: dict[str, int] = {}
    for label, config in (("adabm", SMALL), ("fixed", dataclasses.replace(SMALL, image2bit=False, layer2bit=False))):
        inputs = _sampler()

        def counted(n: int, inputs=inputs, label: str = label) -> torch.Tensor:
            draws[label] = draws.get(label, 0) + 1
            return inputs(n)

        _run(config=config, sampler=counted)
    assert draws["adabm"] == draws["fixed"]


def test_switches_are_validated_and_recorded_in_the_preset() -> None:
    assert ADABM.config("cpu", {"image2bit": False}).image2bit is False
    with pytest.raises(SrquantError, match="layer2bit"):
        AdaBMConfig(layer2bit="no")  # type: ignore[arg-type]


@pytest.mark.parametrize("image2bit,layer2bit", [(True, True), (False, True), (True, False), (False, False)])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_a_checkpoint_reloads_the_controller_and_gives_identical_bits_and_outputs(
    tmp_path: Path, image2bit: bool, layer2bit: bool, granularity: str
) -> None:
    config = dataclasses.replace(SMALL, image2bit=image2bit, layer2bit=layer2bit)
    model, result = _run(config=config, weight_granularity=granularity)
    path = tmp_path / "adabm.pt"
    save_quantized(model.network, path, "adabm", result.spec, {}, {"controller": result.controller.state_dict()})
    again = load_quantized(path)  # the controller comes back with the network: no extra step
    assert isinstance(again, AdaptiveBitsModel)
    assert (again.controller.image2bit, again.controller.layer2bit) == (image2bit, layer2bit)
    x = torch.cat([FLAT, BUSY, _smooth(2)])
    with torch.no_grad():
        assert torch.equal(again.controller(x), result.controller(x))
        assert torch.equal(again(x), model(x))


def test_weight_search_is_per_channel_with_channel_granularity() -> None:
    _, result = _run(weight_granularity="channel")
    layer = result.model.network.get_submodule(result.adaptive_layers[0])
    bounds = layer.weight_quantizer.upper_bound.detach()
    assert bounds.shape == (layer.weight.shape[0],) and len(set(bounds.tolist())) > 1


def _one(values: list[float]) -> list[list[float]]:
    """Per-item tables with only the one-bit move."""
    return [[v] for v in values]


def test_best_offsets_balance_raises_and_cuts_for_the_largest_net_gain() -> None:
    assert best_offsets(_one([0.5, 0.1, 0.0]), _one([0.2, 0.05, 1.0])) == [1, -1, 0]
    assert best_offsets(_one([0.01, 0.02]), _one([0.5, 0.4])) == [0, 0]  # no raise pays for a step down: fixed bits
    # Greedy pairing would raise 0 against 1 (net 0.8); raising 0 and 1 against 2 and 3 nets 1.2.
    assert best_offsets(_one([0.9, 0.8, 0.1, 0.1]), _one([0.0, 0.1, 0.2, 0.3])) == [1, 1, -1, -1]
    gains, costs = torch.rand(9).tolist(), torch.rand(9).tolist()
    chosen = best_offsets(_one(gains), _one(costs))

    def value(offsets: list[int]) -> float:
        return sum(g if o == 1 else -c if o == -1 else 0.0 for o, g, c in zip(offsets, gains, costs, strict=True))

    balanced = [list(o) for o in itertools.product((-1, 0, 1), repeat=9) if sum(o) == 0]
    assert sum(chosen) == 0 and value(chosen) == pytest.approx(max(value(o) for o in balanced))


def test_best_offsets_with_two_bit_moves_is_exact_and_respects_each_items_reach() -> None:
    # Item 0 gains most from +2, which two cheap cuts pay for; item 2 cannot be cut twice (its table stops at -1).
    assert best_offsets([[0.5, 0.9], [0.0, 0.0], [0.0]], [[1.0, 2.0], [0.1, 0.3], [0.05]]) == [2, -1, -1]
    gen = torch.Generator().manual_seed(2)
    gains = [sorted(torch.rand(2, generator=gen).tolist()) for _ in range(6)]
    costs = [sorted(torch.rand(2, generator=gen).tolist()) for _ in range(6)]
    chosen = best_offsets(gains, costs)

    def value(offsets: tuple[int, ...] | list[int]) -> float:
        return sum(gains[k][o - 1] if o > 0 else -costs[k][-o - 1] if o < 0 else 0.0 for k, o in enumerate(offsets))

    balanced = [o for o in itertools.product(range(-2, 3), repeat=6) if sum(o) == 0]
    assert sum(chosen) == 0 and value(chosen) == pytest.approx(max(value(o) for o in balanced))


def test_one_bit_steps_pair_the_largest_marginal_gains_with_the_cheapest_marginal_cuts() -> None:
    # Item 0 at +2: marginal gains 0.5 then 0.1; item 1 at +1: 0.3; item 2 at -2: marginal costs 0.1 then 0.4.
    raises, cuts = one_bit_steps([2, 1, -2, -1], [[0.5, 0.6], [0.3], [], []], [[], [], [0.1, 0.5], [0.2]])
    assert raises == [0, 1, 0] and cuts == [2, 3, 2]


def test_measured_allocation_keeps_fab_at_the_base_and_follows_its_own_measurements() -> None:
    model, controller = _calibrated()
    gen = torch.Generator().manual_seed(5)
    crops, held_out = _smooth(8, gen=gen), _smooth(8, gen=gen)
    report = measured_allocation(model.network, controller, crops, held_out, reclip=False)
    offsets = controller.measure_layer.detach()
    assert float(offsets.sum()) == 0 and set(offsets.tolist()) <= {-1.0, 0.0, 1.0}
    index = {name: k for k, name in enumerate(controller.layer_names)}
    assert len(report.raised) == len(report.lowered)
    assert all(offsets[index[n]] == 1 for n in report.raised) and all(offsets[index[n]] == -1 for n in report.lowered)
    net = sum(report.layer_gain[index[n]][0] for n in report.raised) - sum(
        report.layer_cost[index[n]][0] for n in report.lowered
    )
    assert net > 0 or not report.raised
    assert report.image_direction == max((0, 1, -1), key=lambda d: report.image_gain_db[d])
    assert float(controller.image_direction) == report.image_direction
    bits = controller(crops).detach()
    assert float((bits - 4 - controller.image_bits(crops).detach()[:, None]).mean()) == 0  # layer bits average the base


def test_measured_allocation_with_layer_range_two_moves_layers_by_up_to_two_bits_at_the_base_fab() -> None:
    model, controller = _calibrated(layer_range=2)
    gen = torch.Generator().manual_seed(5)
    crops, held_out = _smooth(8, gen=gen), _smooth(8, gen=gen)
    report = measured_allocation(model.network, controller, crops, held_out, reclip=False)
    assert all(len(g) == 2 and len(c) == 2 for g, c in zip(report.layer_gain, report.layer_cost, strict=True))
    offsets = controller.measure_layer.detach()
    assert float(offsets.sum()) == 0 and set(offsets.tolist()) <= {-2.0, -1.0, 0.0, 1.0, 2.0}
    assert torch.equal(controller.layer_bits().detach(), offsets)  # the clamp reaches +-2
    index = {name: k for k, name in enumerate(controller.layer_names)}
    assert {n: int(offsets[index[n]]) for n in report.offsets} == report.offsets
    assert all(offsets[k] == 0 for n, k in index.items() if n not in report.offsets)
    if report.offsets:  # kept only because it lowered the held-out error
        assert report.layer_held_out_change is not None and report.layer_held_out_change < 0
    with torch.no_grad():
        restored = BitController.from_state(controller.state_dict())
    assert restored.layer_range == 2 and torch.equal(restored.layer_bits(), controller.layer_bits().detach())


def test_layer_range_bounds_the_base_bits_and_is_validated() -> None:
    with pytest.raises(SrquantError, match="layer_range"):
        AdaBMConfig(layer_range=0)
    network = build_model("imdn", 2, tiny=True).eval()
    wide = dataclasses.replace(SMALL, layer_range=2)
    with pytest.raises(SrquantError, match=r"\[4, 13\]"):
        run_adabm(network, REGISTRY["imdn"].layout, QuantSpec(4, 3), _sampler(), wide)


def test_direction_minus_one_gives_flat_images_more_bits_and_zero_switches_image2bit_off() -> None:
    _, controller = _calibrated()
    flat = torch.full((1, 3, 16, 16), 0.4)
    noisy = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    controller.image_direction.fill_(-1.0)
    assert controller.image_bits(flat).item() == 1 and controller.image_bits(noisy).item() == -1
    controller.image_direction.fill_(0.0)
    assert controller.image_bits(noisy).item() == 0
    assert all(p is not controller.measure_l for p in controller.trainable())


def test_a_measured_run_reloads_with_its_direction_and_gives_identical_outputs(tmp_path: Path) -> None:
    config = dataclasses.replace(SMALL, allocation="measured", sensitivity_crops=4)  # 8 calibration crops: 4 + 4
    model, result = _run(config=config)
    assert result.allocation is not None
    path = tmp_path / "adabm.pt"
    save_quantized(model.network, path, "adabm", result.spec, {}, {"controller": result.controller.state_dict()})
    again = load_quantized(path)
    assert float(again.controller.image_direction) == result.allocation.image_direction
    x = torch.cat([FLAT, BUSY, _smooth(2)])
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


@pytest.mark.parametrize("reclip", [False, True])
def test_the_measured_allocation_moves_bits_on_the_tuned_fixed_twin_and_nothing_else(reclip: bool) -> None:
    config = dataclasses.replace(SMALL, allocation="measured", layer_range=2, sensitivity_crops=4, reclip=reclip)
    model, adaptive = _run(config=config)
    twin, fixed = _run(config=dataclasses.replace(config, image2bit=False, layer2bit=False))
    assert adaptive.allocation is not None and fixed.allocation is None
    assert adaptive.losses == fixed.losses  # the same fine-tuning, at the base bits
    bits = adaptive.controller.layer_bits().tolist()
    moved = {n: int(b) for n, b in zip(adaptive.controller.layer_names, bits, strict=True) if b}
    assert moved == adaptive.allocation.offsets and moved
    mine, theirs = model.network.state_dict(), twin.network.state_dict()
    assert mine.keys() == theirs.keys()
    differ = {k for k in mine if not torch.equal(mine[k], theirs[k])}
    if reclip:  # only the moved layers' input ranges, clipped for their new bits
        assert differ and {k.split(".input_quantizer.")[0] for k in differ} <= set(moved)
    else:
        assert not differ
