"""Granular-DQ on tiny models: selected-bit-only quantizers, layer-invariant bits, GBC, E2B, ATC, patches, guard."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from srquant.errors import SrquantError
from srquant.methods.granular_dq import (
    GRANULAR_DQ,
    GRANULAR_DQ_PRESETS,
    PALETTE,
    GranularDQConfig,
    GranularityBitController,
    MultiBitLSQ,
    PatchBit,
    PatchwiseBitsModel,
    bit_map,
    head_conv_name,
    image_bit_report,
    multibit_quantizers,
    patch_boxes,
    patch_entropy,
    run_granular_dq,
    upscale_patchwise,
)
from srquant.methods.granular_dq.training import (
    bit_cost,
    budget_shares,
    head_features,
    patch_errors,
    split_schedule,
)
from srquant.metrics.complexity import bitops
from srquant.models.registry import build_model, get_entry
from srquant.quant.accounting import ops_report
from srquant.quant.quantize import fp_mode
from srquant.quant.quantizers import QuantMode

pytestmark = pytest.mark.usefixtures("one_thread")


def _preset(name: str, **overrides: object) -> GranularDQConfig:
    return GRANULAR_DQ.config(name, overrides)


SMALL = GranularDQConfig(
    iterations=3,
    batch_size=2,
    patch=16,
    lr_milestones=(),
    epoch_iterations=2,
    calib_count=8,
    calib_batch=4,
    guard_seed_batches=2,
    loss="distill",
)


def _crops(n: int, gen: torch.Generator, size: int = 16) -> torch.Tensor:
    """Smooth random crops with a per-sample amount of texture: a spread of entropies."""
    base = F.interpolate(torch.rand(n, 3, 4, 4, generator=gen), size=(size, size), mode="bilinear")
    amount = torch.rand(n, 1, 1, 1, generator=gen) * 0.4
    return (base + amount * (torch.rand(n, 3, size, size, generator=gen) - 0.5)).clamp(0, 1)


def _sampler(seed: int = 0, size: int = 16, scale: int = 4) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        lr = _crops(n, gen, size)
        return lr, F.interpolate(lr, scale_factor=scale, mode="bicubic", align_corners=False).clamp(0, 1)

    return draw


def _trained(name: str = "srresnet", config: GranularDQConfig = SMALL, seed: int = 0):
    torch.manual_seed(seed)  # the float model's random weights; everything after is seeded by the config
    model = build_model(name, 4, tiny=True)
    result = run_granular_dq(model, get_entry(name).layout, _sampler(seed), config)
    return model, result


class _Counter:
    """Forward hook recording (calls, samples) per candidate quantizer."""

    def __init__(self) -> None:
        self.calls: dict[tuple[str, int], int] = {}
        self.samples: dict[tuple[str, int], int] = {}

    def attach(self, name: str, quantizer: MultiBitLSQ) -> None:
        for bit, cand in quantizer.candidates.items():

            def hook(_m: nn.Module, args: tuple, _out: torch.Tensor, key: tuple[str, int] = (name, int(bit))) -> None:
                self.calls[key] = self.calls.get(key, 0) + 1
                self.samples[key] = self.samples.get(key, 0) + args[0].shape[0]

            cand.register_forward_hook(hook)


def test_only_selected_bits_quantizer_runs() -> None:
    q = MultiBitLSQ((4, 5, 6, 8), signed=True)
    q.mode = QuantMode.QUANT
    for cand in q.candidates.values():
        cand.mode = QuantMode.QUANT
    q.init_lsq(0.5)
    counter = _Counter()
    counter.attach("q", q)
    x = torch.randn(4, 3, 5, 5)
    q.select(torch.tensor([4, 8, 8, 4]))
    out = q(x)
    assert counter.calls == {("q", 4): 1, ("q", 8): 1}
    assert counter.samples == {("q", 4): 2, ("q", 8): 2}
    torch.testing.assert_close(out[[0, 3]], q.candidates["4"](x[[0, 3]]))
    torch.testing.assert_close(out[[1, 2]], q.candidates["8"](x[[1, 2]]))
    assert not torch.equal(out[0], q.candidates["8"](x[:1])[0])  # the bits really differ
    with pytest.raises(SrquantError):
        q.select(torch.tensor([7, 4, 4, 4]))
        q(x)


def test_training_gate_compares_the_bits_and_forwards_the_selected_one_exactly() -> None:
    q = MultiBitLSQ((4, 8))
    q.mode = QuantMode.QUANT
    for cand in q.candidates.values():
        cand.mode = QuantMode.QUANT
    q.init_lsq(0.5)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    gate = torch.tensor([[1.0, 0.0], [1.0, 0.0]], requires_grad=True)  # both samples chose code 0 (4 bits)
    q.select(torch.tensor([4, 4]), gate, torch.tensor([[4, 8], [4, 8]]))
    out = q(x)
    assert torch.equal(out, q.candidates["4"](x))  # the forward value is the selected quantizer's, exactly
    ((out - x) ** 2).sum().backward()  # reconstruction error: 8 bits would do better
    assert gate.grad is not None and torch.isfinite(gate.grad).all()
    assert (gate.grad[:, 1] < gate.grad[:, 0]).all()  # descent moves probability towards the 8-bit code
    with pytest.raises(SrquantError, match="alternatives"):
        q.select(torch.tensor([4, 4]), gate)


def test_layer_invariant_bits_per_patch() -> None:
    model, result = _trained("srresnet", dataclasses.replace(SMALL, iterations=0))
    counter = _Counter()
    for name, q in zip(result.layers, multibit_quantizers(model, result.controller), strict=True):
        counter.attach(name, q)
    gen = torch.Generator().manual_seed(3)
    batch = torch.cat([torch.full((1, 3, 16, 16), 0.5), torch.rand(1, 3, 16, 16, generator=gen), _crops(2, gen)])
    with torch.no_grad():
        result.controller.fc.weight.zero_()
        result.controller.fc.bias.copy_(torch.tensor([0.0, 0.0, 5.0]))  # GBC -> 8, E2B spreads by entropy
        model(batch)
    bits = result.controller.last_bits
    assert bits is not None and bits.shape == (4,) and bits[0] == 4 and bits[1] == 8
    for name, q in zip(result.layers, multibit_quantizers(model, result.controller), strict=True):
        assert torch.equal(q.sample_bits, bits)
        for b in set(bits.tolist()):
            assert counter.samples[(name, b)] == int((bits == b).sum())  # every layer, the same bit per sample
        assert {k[1] for k in counter.calls if k[0] == name} == set(bits.tolist())


def test_granularity_features_differ() -> None:
    ctrl = GranularityBitController(["a"], 8, GranularDQConfig())
    feat = torch.randn(2, 8, 16, 16)
    fine, mid, coarse = ctrl.granularity_features(feat)
    assert fine.shape == (2, 8 * 16) and mid.shape == (2, 8 * 4) and coarse.shape == (2, 8)
    grid4, grid2 = fine.view(2, 8, 16), mid.view(2, 8, 4)
    assert (grid4.std(dim=2) > 1e-3).all() and (grid2.std(dim=2) > 1e-3).all()  # spatial structure is kept
    assert not torch.allclose(grid2, coarse.view(2, 8, 1).expand(2, 8, 4))
    assert not torch.allclose(grid4[..., :4], grid2)


def test_eval_bits_deterministic_train_bits_follow_seed() -> None:
    cfg = GranularDQConfig()
    a, b = GranularityBitController(["x"], 8, cfg), GranularityBitController(["x"], 8, cfg)
    assert torch.equal(a.fc.weight, b.fc.weight)  # seeded initialisation
    with torch.no_grad():
        a.fc.weight.zero_()
        a.fc.bias.zero_()
    logits = torch.zeros(64, 3)
    a.eval()
    first = a.choose(logits)
    assert all(torch.equal(first, a.choose(logits)) for _ in range(3))
    a.train()
    a.reseed(0)
    s0 = a.choose(logits)
    a.reseed(0)
    assert torch.equal(s0, a.choose(logits))
    a.reseed(1)
    assert not torch.equal(s0, a.choose(logits))
    assert len(set(s0.argmax(-1).tolist())) > 1


def test_same_seed_same_bits_and_outputs() -> None:
    image = _crops(1, torch.Generator().manual_seed(5), size=40)[0]
    outs = []
    for _ in range(2):
        model, result = _trained("srresnet", SMALL, seed=0)
        sr, bits = upscale_patchwise(model, result.controller, image, patch=24, step=20)
        sr2, bits2 = upscale_patchwise(model, result.controller, image, patch=24, step=20)
        assert torch.equal(sr, sr2) and bits == bits2  # eval bits are never random
        outs.append((sr, bits))
    assert torch.equal(outs[0][0], outs[1][0]) and outs[0][1] == outs[1][1]


def test_e2b_maps_entropy_to_bits() -> None:
    ctrl = GranularityBitController(["x"], 8, GranularDQConfig())
    flat = torch.full((1, 3, 24, 24), 0.4)
    noise = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    e_flat, e_noise = patch_entropy(flat), patch_entropy(noise)
    assert float(e_flat) < float(e_noise)
    ctrl.thresholds.copy_(torch.tensor([float(e_flat) + 0.1, float(e_flat) + 0.2]))
    assert ctrl.e2b(torch.cat([e_flat, e_noise])).tolist() == [4, 8]
    ctrl.thresholds.copy_(torch.tensor([float(e_flat) - 0.2, float(e_noise) + 0.1]))
    assert ctrl.e2b(torch.cat([e_flat, e_noise])).tolist() == [5, 5]
    # E2B applies only to patches GBC sent to 8 bits.
    ctrl.eval()
    ctrl.thresholds.copy_(torch.tensor([float(e_flat) + 0.1, float(e_flat) + 0.2]))
    lr = torch.cat([flat, noise])
    feat = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        ctrl.fc.weight.zero_()
        ctrl.fc.bias.copy_(torch.tensor([0.0, 0.0, 5.0]))  # GBC -> 8 for every patch
        assert ctrl(feat, lr)[0].tolist() == [4, 8]
        ctrl.fc.bias.copy_(torch.tensor([0.0, 5.0, 0.0]))  # GBC -> 6: E2B not applied
        assert ctrl(feat, lr)[0].tolist() == [6, 6]


def test_atc_moves_thresholds_only_in_first_epoch() -> None:
    cfg = dataclasses.replace(SMALL, iterations=5, epoch_iterations=2, atc_gamma=0.5, lr=1e-5)
    _, result = _trained("srresnet", cfg)
    assert not result.rollbacks
    t = result.thresholds
    assert len(t) == 6 and result.controller.atc_updates.item() == 2
    assert t[1] != t[0] and t[2] != t[1]
    assert t[2] == t[3] == t[4] == t[5]


def test_patchwise_identity_model_equals_whole_image() -> None:
    model = nn.Upsample(scale_factor=2, mode="nearest")
    image = torch.rand(3, 37, 50, generator=torch.Generator().manual_seed(0))
    sr, bits = upscale_patchwise(model, None, image, patch=16, step=12, batch=3)
    torch.testing.assert_close(sr, model(image[None])[0])
    boxes = patch_boxes(37, 50, 16, 12)
    assert [(p.top, p.left, p.height, p.width) for p in bits] == boxes and all(p.bit == 32 for p in bits)
    assert boxes[-1][0] + 16 == 37 and boxes[-1][1] + 16 == 50


def test_patchwise_quantized_model_reports_per_patch_bits() -> None:
    model, result = _trained("srresnet", dataclasses.replace(SMALL, iterations=0))
    image = torch.cat([torch.full((3, 20, 20), 0.5), torch.rand(3, 20, 20)], dim=2)  # flat left, noisy right
    sr, bits = upscale_patchwise(model, result.controller, image, patch=20, step=20)
    assert sr.shape == (3, 80, 160) and len(bits) == 2
    with torch.no_grad():
        left = model(image[None, :, :, :20])[0]
    torch.testing.assert_close(sr[:, :, :80], left)  # a lone patch equals its own forward
    with fp_mode(model):
        sr_fp, bits_fp = upscale_patchwise(model, result.controller, image, patch=20, step=20)
        assert all(p.bit == 32 for p in bits_fp)
        torch.testing.assert_close(sr_fp, model(image[None])[0], atol=0.2, rtol=0)


def test_fab_and_bitops() -> None:
    model, result = _trained("srresnet", dataclasses.replace(SMALL, iterations=0))
    bits = [PatchBit(0, 0, 16, 16, 4), PatchBit(0, 12, 16, 16, 8), PatchBit(12, 0, 8, 16, 5)]
    rep = image_bit_report(model, result.layers, bits, scale=4)
    assert rep.fab == pytest.approx((4 + 8 + 5) / 3)
    expected = bitops(ops_report(model, 4, (16, 16)), {n: (8, 8) for n in result.layers})
    assert rep.patch_bitops[1] == pytest.approx(expected)
    assert rep.patch_bitops[0] < rep.patch_bitops[1]
    weighted = (rep.patch_bitops[0] * 256 + rep.patch_bitops[1] * 256 + rep.patch_bitops[2] * 128) / 640
    assert rep.bitops == pytest.approx(weighted) and rep.bitops_total == pytest.approx(sum(rep.patch_bitops))
    body = image_bit_report(model, result.layers, bits, scale=4, body_only=True)
    assert body.patch_bitops[0] < rep.patch_bitops[0] and "fab" in rep.to_dict()


def test_bit_map_shape_and_tint() -> None:
    image = torch.full((3, 30, 40), 0.5)
    bits = [PatchBit(0, 0, 30, 20, 4), PatchBit(0, 20, 30, 20, 8)]
    out = bit_map(image, bits)
    assert out.shape == (30, 40, 3) and out.dtype == np.uint8
    assert out[5, 5, 0] > out[5, 5, 1]  # 4 bits: red tint
    assert out[5, 30, 1] > out[5, 30, 0]  # 8 bits: green tint
    assert tuple(PALETTE) == (4, 5, 6, 8)
    assert bit_map(np.zeros((30, 40, 3), np.uint8), bits).shape == (30, 40, 3)


def test_guard_recovers_from_injected_nan() -> None:
    draw = _sampler(0)
    calls = {"n": 0}
    base = 2 + SMALL.guard_seed_batches  # calibration batches, then the guard's seed batches

    def poisoned(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        calls["n"] += 1
        lr, hr = draw(n)
        if calls["n"] == base + 2:  # the second training step
            lr = lr.clone()
            lr[0, 0, 0, 0] = float("nan")
        return lr, hr

    model = build_model("srresnet", 4, tiny=True)
    cfg = dataclasses.replace(SMALL, iterations=4, loss="qat")
    result = run_granular_dq(model, get_entry("srresnet").layout, poisoned, cfg)
    assert len(result.rollbacks) == 1 and "step 1" in result.rollbacks[0] and not result.stopped_early
    assert len(result.losses) == 3 and all(math.isfinite(v) for v in result.losses)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with torch.no_grad():
        assert torch.isfinite(model(_crops(2, torch.Generator().manual_seed(9)))).all()


def test_models_heads_and_config() -> None:
    heads = {"imdn": "fea_conv", "pan": "conv_first", "edsr-baseline": "head.0", "carn-m": "entry"}
    for name, head in heads.items():
        assert head_conv_name(build_model(name, 4, tiny=True), get_entry(name).layout) == head
    assert GRANULAR_DQ_PRESETS["paper"].iterations == 300_000 and GRANULAR_DQ_PRESETS["paper"].atc_gamma == 0.9997
    assert _preset("cpu", batch_size=2).batch_size == 2
    stretched = _preset("cpu", iterations=2000)  # the schedule keeps its fractions
    cpu = GRANULAR_DQ_PRESETS["cpu"]
    assert stretched.lr_milestones == tuple(10 * m for m in cpu.lr_milestones)
    assert stretched.epoch_iterations == 10 * cpu.epoch_iterations
    pinned = _preset("cpu", iterations=2000, epoch_iterations=7, lr_milestones=(5,))
    assert (pinned.epoch_iterations, pinned.lr_milestones) == (7, (5,))
    bads = ({"loss": "l2"}, {"e2b_quantiles": (0.9, 0.5)}, {"gbc_bits": (3, 8)}, {"lr": 0.0}, {"entropy_patch": 0})
    for bad in bads:
        with pytest.raises(SrquantError):
            GranularDQConfig(**bad)  # type: ignore[arg-type]
    with pytest.raises(SrquantError):
        _preset("fast")


def test_imdn_qat_runs() -> None:
    cfg = dataclasses.replace(SMALL, loss="qat", bit_penalty=0.1)
    model, result = _trained("imdn", cfg)
    assert len(result.losses) + len(result.rollbacks) == 3 and result.mean_bits
    assert not result.controller.training
    image = _crops(1, torch.Generator().manual_seed(1), size=30)[0]
    sr, bits = upscale_patchwise(model, result.controller, image, patch=16, step=14)
    assert sr.shape == (3, 120, 120) and all(p.bit in (4, 5, 6, 8) for p in bits)


def _record_bits(model: nn.Module) -> set[int]:
    """Every per-sample bit the model's multi-bit quantizers were set to, recorded after each forward."""
    seen: set[int] = set()

    def hook(module: nn.Module, _args: tuple, _out: torch.Tensor) -> None:
        for m in module.modules():
            if isinstance(m, MultiBitLSQ) and m.sample_bits is not None:
                seen.update(m.sample_bits.tolist())
                return

    model.register_forward_hook(hook)
    return seen


def test_switch_validation() -> None:
    assert GranularDQConfig().e2b and GranularDQConfig().atc and GranularDQConfig().fixed_bits is None
    assert GranularDQConfig(fixed_bits=4).candidate_bits == (4,) and GranularDQConfig().candidate_bits == (4, 5, 6, 8)
    for bad in ({"e2b": False}, {"fixed_bits": 7}, {"fixed_bits": True}, {"fixed_bits": 6, "act_bits": (4, 8)}):
        with pytest.raises(SrquantError):
            GranularDQConfig(**bad)  # type: ignore[arg-type]
    GranularDQConfig(e2b=False, atc=False)
    GranularDQConfig(fixed_bits=8, e2b=False, atc=False)


def test_fixed_bits_runs_every_patch_at_that_bit_without_the_controller() -> None:
    cfg = dataclasses.replace(SMALL, iterations=4, fixed_bits=4, loss="qat", bit_penalty=0.1)
    torch.manual_seed(0)
    model = build_model("srresnet", 4, tiny=True)
    seen = _record_bits(model)
    result = run_granular_dq(model, get_entry("srresnet").layout, _sampler(0), cfg)
    ctrl = result.controller
    assert seen == {4} and set(result.mean_bits) == {4.0}
    assert len(result.losses) + len(result.rollbacks) == 4 and ctrl.atc_updates.item() == 0
    fresh = GranularityBitController(result.layers, model.get_submodule(result.head).out_channels, cfg)
    assert all(torch.equal(a, b) for a, b in zip(ctrl.parameters(), fresh.parameters(), strict=True))  # untrained
    assert all(q.candidate_bits == (4,) for q in multibit_quantizers(model, ctrl))  # the one LSQ quantizer at 4
    image = _crops(1, torch.Generator().manual_seed(2), size=40)[0]
    sr, bits = upscale_patchwise(model, ctrl, image, patch=16, step=12)
    assert len(bits) > 1 and {p.bit for p in bits} == {4}
    assert image_bit_report(model, result.layers, bits, scale=4).fab == 4.0
    sr2, bits2 = upscale_patchwise(model, ctrl, image, patch=16, step=12)
    assert torch.equal(sr, sr2) and bits == bits2


def test_e2b_off_never_gives_the_e2b_only_bit() -> None:
    cfg = dataclasses.replace(SMALL, iterations=6, batch_size=4, e2b=False, atc=False)
    torch.manual_seed(0)
    model = build_model("srresnet", 4, tiny=True)
    seen = _record_bits(model)
    result = run_granular_dq(model, get_entry("srresnet").layout, _sampler(0), cfg)
    ctrl = result.controller
    assert seen and seen <= {4, 6, 8} and not ctrl.use_e2b  # training: GBC's codes only
    flat = torch.full((1, 3, 16, 16), 0.5)
    noise = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    e_flat, e_noise = float(patch_entropy(flat)), float(patch_entropy(noise))
    with torch.no_grad():
        ctrl.fc.weight.zero_()
        ctrl.fc.bias.copy_(torch.tensor([0.0, 0.0, 5.0]))  # GBC -> 8 for every patch
        ctrl.thresholds.copy_(torch.tensor([e_flat + 0.01, e_noise + 0.1]))  # E2B would give 4 and 5
        model(torch.cat([flat, noise]))
        assert ctrl.last_bits.tolist() == [8, 8]
        ctrl.use_e2b = True
        model(torch.cat([flat, noise]))
        assert ctrl.last_bits.tolist() == [4, 5]


def test_atc_off_keeps_the_calibrated_thresholds() -> None:
    cfg = dataclasses.replace(SMALL, iterations=5, epoch_iterations=3, atc_gamma=0.5, lr=1e-5, atc=False)
    _, result = _trained("srresnet", cfg)
    assert len(result.thresholds) == 6 and all(t == result.thresholds[0] for t in result.thresholds)
    assert result.controller.atc_updates.item() == 0
    assert tuple(result.controller.thresholds.tolist()) == result.thresholds[0]


def test_switches_travel_with_the_controller_state() -> None:
    off = GranularityBitController(["x"], 8, GranularDQConfig(e2b=False, atc=False, fixed_bits=6))
    state = off.state_dict()
    again = GranularityBitController(["x"], 8, GranularDQConfig())
    again.load_state_dict(state)
    assert (again.use_e2b, again.use_atc, again.fixed_bits) == (False, False, 6)
    old = dict(state)  # a state saved before the switches existed: the full method
    old["_extra_state"] = {k: v for k, v in state["_extra_state"].items() if k in ("layer_names", "gbc_bits", "e2b")}
    legacy = GranularityBitController(["x"], 8, GranularDQConfig(e2b=False, atc=False, fixed_bits=4))
    legacy.load_state_dict(old)
    assert (legacy.use_e2b, legacy.use_atc, legacy.fixed_bits) == (True, True, None)
    with pytest.raises(SrquantError, match="other layers"):
        GranularityBitController(["y"], 8, GranularDQConfig()).load_state_dict(state)


def test_a_bit_budget_pushes_the_controller_towards_cheaper_bits() -> None:
    """Above the target, a descent step on the budget raises the lowest code's logit and lowers the highest one's."""
    config = dataclasses.replace(SMALL, target_fab=4.5, budget_weight=1.0, e2b=False, atc=False)
    controller = GranularityBitController(["a"], 8, config).train()
    with torch.no_grad():
        controller.fc.bias.copy_(torch.tensor([0.0, 0.0, 3.0]))  # mostly the top code (8 bits)
    feat = torch.randn(4, 8, 6, 6, generator=torch.Generator().manual_seed(0))
    controller(feat, torch.rand(4, 3, 6, 6))
    cost = bit_cost(controller, config)
    assert isinstance(cost, torch.Tensor) and float(cost.detach()) > 0
    cost.backward()
    grad = controller.fc.bias.grad
    assert grad is not None and grad[0] < 0 < grad[2]  # a descent step raises the 4-bit logit, lowers the 8-bit one


def test_bit_cost_is_the_hinge_above_the_target_and_nothing_for_a_fixed_bit() -> None:
    config = dataclasses.replace(SMALL, target_fab=5.0, budget_weight=2.0)
    controller = GranularityBitController(["a"], 8, config)
    controller.last_expected_bits = torch.tensor([4.0, 8.0])  # mean 6: 1 bit above the target
    assert float(bit_cost(controller, config)) == pytest.approx(2.0)
    controller.last_expected_bits = torch.tensor([4.0, 5.0])
    assert float(bit_cost(controller, config)) == 0.0
    fixed = GranularityBitController(["a"], 8, dataclasses.replace(config, fixed_bits=4))
    fixed.last_expected_bits = torch.tensor([8.0])
    assert bit_cost(fixed, config) == 0.0
    with pytest.raises(SrquantError, match="target_fab"):
        dataclasses.replace(SMALL, target_fab=9.0)


def test_random_control_gives_patches_the_histogram_bits_deterministically_and_leaves_the_fitted_one() -> None:
    model, result = _trained()
    result.attachment.detach(model, result.controller)
    wrapped = PatchwiseBitsModel(model, result.controller, result.head, patch=16, stride=12)
    image = _crops(1, torch.Generator().manual_seed(2), size=40)
    with torch.no_grad():
        fitted_out = wrapped(image)
        fitted_bits = [p.bit for p in wrapped.patch_bits(image)]
        control = result.controller.randomized({4: 1, 8: 1}, seed=1)
        wrapped.use_controller(control)
        out = wrapped(image)
        bits = [p.bit for p in wrapped.patch_bits(image)]
        assert set(bits) <= {4, 8} and len(set(bits)) == 2  # 9 patches: both bits drawn
        assert torch.equal(out, wrapped(image))  # deterministic
        assert result.controller.random_shares is None  # the fitted controller is untouched
        wrapped.use_controller(result.controller)
        assert torch.equal(wrapped(image), fitted_out) and [p.bit for p in wrapped.patch_bits(image)] == fitted_bits
    with pytest.raises(SrquantError, match="not among"):
        result.controller.randomized({7: 1})


def test_a_target_fab_calibrates_a_bit_price_that_meets_it_on_the_calibration_patches() -> None:
    config = dataclasses.replace(SMALL, target_fab=4.5, e2b=False, atc=False)
    model, result = _trained(config=config)
    controller = result.controller
    patches = _crops(16, torch.Generator().manual_seed(9))
    features = head_features(model, result.head, patches)
    with torch.no_grad():
        controller.bit_price.fill_(0.0)
        free = float(controller(features, patches)[0].double().mean())
        price = controller.calibrate_bit_price(features, patches, 4.5)
        priced = float(controller(features, patches)[0].double().mean())
    assert priced <= 4.5 and (price == 0.0) == (free <= 4.5)
    assert result.bit_price >= 0 and float(controller.bit_price) == price
    with torch.no_grad():  # the smallest such price: a little less gives more bits than the target
        if price > 0:
            controller.bit_price.fill_(price * 0.9)
            assert float(controller(features, patches)[0].double().mean()) > 4.5


def test_measured_allocation_needs_a_budget_and_drops_e2b() -> None:
    with pytest.raises(SrquantError, match="target_fab"):
        dataclasses.replace(SMALL, allocation="measured")
    config = dataclasses.replace(SMALL, allocation="measured", target_fab=5.0)
    controller = GranularityBitController(["a"], 8, config)
    assert controller.gbc_bits == tuple(sorted(config.act_bits)) and not controller.use_e2b
    assert controller.get_extra_state()["measured"] is True


def test_the_distortion_fit_recovers_which_patches_lose_most_at_few_bits() -> None:
    config = dataclasses.replace(SMALL, allocation="measured", target_fab=5.0, grids=(1,))
    controller = GranularityBitController(["a"], 8, config).eval()
    gen = torch.Generator().manual_seed(3)
    feat = torch.randn(200, 8, 4, 4, generator=gen)
    feat = feat * torch.rand(200, 1, 1, 1, generator=gen).mul(3).exp()  # patches of different magnitudes
    texture = controller.magnitude_features(feat)[:, 0]  # channel 0's log energy: some patches need bits more
    bits = torch.tensor(controller.gbc_bits, dtype=torch.float64)
    log_errors = -0.7 * bits[None, :] + (0.3 + 0.1 * bits[None, :]) * texture[:, None].double() - 2.0
    held_out = controller.fit_distortion(feat, log_errors.exp())
    assert held_out < 0.01
    with torch.no_grad():
        predicted = -controller.logits(feat)
    assert torch.allclose(predicted.double().log(), log_errors, atol=0.2)
    controller.calibrate_bit_price(feat, torch.rand(200, 3, 8, 8, generator=gen), 5.0)
    with torch.no_grad():
        chosen = controller(feat, torch.rand(200, 3, 8, 8, generator=gen))[0].double()
    assert chosen.mean() <= 5.0 and len(set(chosen.tolist())) > 1  # content decides, within the budget
    order = texture.argsort()
    low, high = chosen[order[:50]].mean(), chosen[order[-50:]].mean()
    assert high > low  # the patches whose error grows most get the bits


def test_a_measured_run_trains_every_bit_fits_the_controller_and_meets_the_budget() -> None:
    config = dataclasses.replace(SMALL, allocation="measured", target_fab=5.0, distortion_count=8)
    model, result = _trained(config=config)
    assert set(result.mean_bits) and min(result.mean_bits) < max(result.mean_bits)  # random bits while training
    assert result.distortion_fit is not None and math.isfinite(result.distortion_fit)
    patches = _crops(8, torch.Generator().manual_seed(5))
    errors = patch_errors(model, result.controller, [patches])
    assert errors.shape == (8, len(result.controller.gbc_bits)) and bool((errors >= 0).all())
    assert float(errors[:, 0].mean()) > float(errors[:, -1].mean())  # 4 bits err more than 8
    with torch.no_grad():
        model(patches)
    bits = result.controller.last_bits
    assert bits is not None and set(bits.tolist()) <= set(result.controller.gbc_bits)
    again = GranularityBitController(result.layers, result.controller.channels, config)
    again.load_state_dict(result.controller.state_dict())
    assert again.measured and torch.equal(again.bit_price, result.controller.bit_price)


def test_training_shares_for_a_budget_have_that_mean_and_spread_over_every_bit() -> None:
    for mean in (4.5, 5.0, 6.5):
        shares = budget_shares((4, 5, 6, 8), mean)
        assert math.isclose(sum(shares.values()), 1.0, abs_tol=1e-9)
        assert math.isclose(sum(b * p for b, p in shares.items()), mean, abs_tol=1e-6)
        assert all(p > 0 for p in shares.values())
    low, high = budget_shares((4, 5, 6, 8), 4.5), budget_shares((4, 5, 6, 8), 6.5)
    assert low[4] > high[4] and low[8] < high[8]
    with pytest.raises(SrquantError, match="outside"):
        budget_shares((4, 5, 6, 8), 9.0)


def test_a_split_schedule_adds_up_to_the_whole_one() -> None:
    config = dataclasses.replace(SMALL, iterations=200, lr_milestones=(80, 160), lr=1e-3, lr_gamma=0.5)
    head, tail = split_schedule(config, 100)
    assert (head.iterations, tail.iterations) == (100, 100)
    assert head.lr_milestones == (80,) and tail.lr_milestones == (60,)
    assert head.lr == 1e-3 and math.isclose(tail.lr, 5e-4) and tail.epoch_iterations == 0
    whole, nothing = split_schedule(config, 200)
    assert whole.lr_milestones == (80, 160) and nothing.iterations == 0
