"""Block reconstruction (learned rounding, QDrop) and PTQ4SR's DBDC+Pac on tiny models."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from srquant.errors import SrquantError
from srquant.methods import recon
from srquant.methods.dbdc_pac import DBDC_PAC_PRESETS, pac_schedule
from srquant.methods.pipeline import load_quantized, quantize_model, save_quantized
from srquant.methods.ptq import calibrate
from srquant.methods.recon import ReconConfig, block_data, blocks_of, distil_ranges, run_recon
from srquant.methods.training import float_teacher
from srquant.methods.twodquant import DQCReport, run_dqc
from srquant.models.registry import REGISTRY, build_model
from srquant.quant.calibrators import DensityClipCalibrator, is_weight_quantizer
from srquant.quant.quantize import fp_mode, quantize_, quantizers
from srquant.quant.quantizers import AsymmetricQuantizer, QuantMode
from srquant.quant.rounding import DropMask, LearnedRounding, annealed_beta, attach_rounding, fold_rounding
from srquant.quant.spec import QuantSpec

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = ReconConfig(iterations=40, batch_size=4, calib_count=16, calib_size=16, calib_batch=8)


def _smooth(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, size // 4, size // 4, generator=gen)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear").clamp(0, 1)


def _quantized(name: str = "imdn", bits: int = 3, **spec: object) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(name, 2, tiny=True).eval()
    quantize_(model, QuantSpec(bits, bits, **spec), REGISTRY[name].layout)
    calibrate(model, list(_smooth(16).split(8)), "dobi")
    return model


def _error(model: torch.nn.Module, x: torch.Tensor, reference: torch.nn.Module | None = None) -> float:
    """Output MSE against `reference` (a float copy), or against the model's own FP mode."""
    with torch.no_grad():
        out = model(x)
        if reference is not None:
            ref = reference(x)
        else:
            with fp_mode(model):
                ref = model(x)
    return float((out - ref).pow(2).mean())


def test_learned_rounding_starts_at_nearest_and_folds_onto_the_grid() -> None:
    q = AsymmetricQuantizer(3, rows=4)
    w = torch.randn(4, 6, 3, 3, generator=torch.Generator().manual_seed(0))
    q.set_range(w.reshape(4, -1).amin(1), w.reshape(4, -1).amax(1))
    q.mode = QuantMode.QUANT
    rounding = LearnedRounding(q, w)
    with torch.no_grad():
        assert torch.allclose(rounding(soft=False), q(w), atol=1e-6)  # hard codes start as round-to-nearest
    assert rounding.regularizer(20.0) > rounding.regularizer(2.0) >= 0
    assert annealed_beta(0, 100) == 20.0 and annealed_beta(100, 100) == pytest.approx(2.0)
    assert annealed_beta(19, 100) == 20.0 and 2.0 < annealed_beta(60, 100) < 20.0


def test_fold_writes_grid_values_and_detaches() -> None:
    model = _quantized()
    layer = model.get_submodule("IMDB1.c1")
    rounding = attach_rounding(layer)
    with torch.no_grad():
        rounding.offset.copy_(torch.randn(rounding.offset.shape, generator=torch.Generator().manual_seed(1)))
        learned = rounding(soft=False)
    fold_rounding(layer)
    assert layer.weight_quantizer.rounding is None
    with torch.no_grad():
        assert torch.equal(layer.weight, learned)
        assert torch.equal(layer.weight_quantizer(layer.weight), layer.weight)  # grid values map to themselves


def test_drop_masks_keep_the_asked_share_and_are_seeded() -> None:
    x = torch.zeros(4, 8, 16, 16)
    first = DropMask(0.3, torch.Generator().manual_seed(0))(x)
    again = DropMask(0.3, torch.Generator().manual_seed(0))(x)
    assert first.shape == x.shape and torch.equal(first, again)
    assert abs(first.float().mean().item() - 0.3) < 0.03


def test_blocks_are_the_stages_then_the_layers_outside_them_in_execution_order() -> None:
    model = _quantized(full=True)
    blocks = blocks_of(model, torch.rand(1, 3, 8, 8))
    assert blocks[0] == "fea_conv" and blocks[1:3] == ["IMDB1", "IMDB2"]
    assert blocks[-1] == "upsampler.0"


@pytest.mark.parametrize("name", ["imdn", "swinir-light"])
def test_reconstruction_lowers_the_output_error_and_reloads_bit_identically(name: str, tmp_path: Path) -> None:
    model = _quantized(name)
    floating = float_teacher(model)  # recon writes grid values into the weights: the float network is a copy
    held_out = _smooth(4, seed=9)
    before = _error(model, held_out, floating)
    notes = run_recon(model, list(_smooth(16).split(8)), SMALL)
    assert not notes
    assert _error(model, held_out, floating) < before
    weights = [q for n, q in quantizers(model) if is_weight_quantizer(n)]
    assert all(q.rounding is None for q in weights)  # folded
    path = tmp_path / "q.pt"
    save_quantized(model, path, "recon", QuantSpec(3, 3), {})
    again = load_quantized(path)
    with torch.no_grad():
        assert torch.equal(model(held_out), again(held_out))


def test_every_block_is_fitted_to_the_float_network_not_to_the_rounded_blocks_before_it(monkeypatch) -> None:
    model = _quantized()
    floating = float_teacher(model)
    batches = list(_smooth(16).split(8))
    targets: dict[str, torch.Tensor] = {}
    fit = recon.reconstruct_block

    def spy(block, quantized, float_data, config, generator, label, progress=False):  # noqa: ANN001, ANN202
        targets[label.split()[-1]] = float_data.outputs
        return fit(block, quantized, float_data, config, generator, label, progress)

    monkeypatch.setattr(recon, "reconstruct_block", spy)
    run_recon(model, batches, dataclasses.replace(SMALL, iterations=10))
    assert set(targets) == {"IMDB1", "IMDB2"}
    for name in ("IMDB1", "IMDB2"):  # IMDB2 comes after IMDB1, whose weights now hold grid values
        expected = block_data(floating, floating.get_submodule(name), batches, quantized=False).outputs
        assert torch.equal(targets[name], expected)
    with torch.no_grad(), fp_mode(model):
        assert not torch.equal(model(batches[0]), floating(batches[0]))  # the model's own FP mode has moved


def test_end_to_end_distillation_after_recon_learns_from_the_float_network(monkeypatch) -> None:
    model = _quantized()
    floating = float_teacher(model)
    seen: dict[str, torch.nn.Module] = {}

    def spy(model, draw, config, progress=False, params=None, teacher=None):  # noqa: ANN001, ANN202
        seen["teacher"] = teacher
        return run_dqc(model, draw, config, progress, params, teacher)

    monkeypatch.setattr(recon, "run_dqc", spy)
    config = dataclasses.replace(SMALL, iterations=5, e2e_iterations=3, e2e_batch=2)
    run_recon(model, list(_smooth(16).split(8)), config, draw_e2e=lambda n: _smooth(n, seed=5))
    probe = _smooth(2, seed=3)
    with torch.no_grad():
        assert torch.equal(seen["teacher"](probe), floating(probe))


def test_learned_rounding_moves_some_codes_off_nearest() -> None:
    model = _quantized()
    layer = model.get_submodule("IMDB1.c1")
    with torch.no_grad():
        nearest = layer.weight_quantizer(layer.weight).clone()
    run_recon(model, list(_smooth(16).split(8)), dataclasses.replace(SMALL, iterations=80, lr_rounding=0.1))
    assert not torch.equal(layer.weight, nearest)


def test_density_clipping_trims_the_sparse_tail_only() -> None:
    gen = torch.Generator().manual_seed(0)
    bulk = torch.rand(200_000, generator=gen)  # [0, 1)
    x = torch.cat([bulk, torch.full((10,), 40.0)])  # 10 far outliers above: 5e-5 of the values
    cal = DensityClipCalibrator("t", AsymmetricQuantizer(4))
    cal.collect(x)
    low, high = cal.compute()
    assert float(low) == pytest.approx(0.0, abs=0.01) and float(high) < 1.05
    weight = DensityClipCalibrator("w", AsymmetricQuantizer(4, rows=2), static=True)
    weight.collect(torch.tensor([[0.0, 5.0, 1.0], [-2.0, 0.0, 1.0]]))
    assert weight.compute()[1].tolist() == [5.0, 1.0]  # weights keep their per-channel min/max


def test_pac_trains_the_bounds_only_and_stays_sound() -> None:
    model = _quantized(bits=4)
    state = {k: v.clone() for k, v in model.state_dict().items() if "quantizer" not in k}
    gen = torch.Generator().manual_seed(3)
    config = dataclasses.replace(DBDC_PAC_PRESETS["cpu"], iterations=10)
    acts = [p for n, q in quantizers(model) if not is_weight_quantizer(n) for p in q.parameters()]
    before = [p.detach().clone() for p in acts]
    report = run_dqc(
        model,
        lambda n: _smooth(n, seed=int(torch.randint(99, (1,), generator=gen))),
        pac_schedule(config, config.lr_act, config.lr_act_end),
        params=acts,
    )
    assert not report.rollbacks and len(report.losses) == 10
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())  # network weights untouched
    assert any(not torch.equal(a, b) for a, b in zip(acts, before, strict=True))  # the activation bounds moved


def _undecided_share_at_fold(monkeypatch, config: ReconConfig) -> float:  # noqa: ANN001
    """The share of soft rounding decisions still strictly between 0.01 and 0.99 when the blocks fold them."""
    shares: list[float] = []
    fold = recon.fold_rounding

    def spy(module: torch.nn.Module) -> None:
        rounding = module.weight_quantizer.rounding
        if rounding is not None:
            h = rounding.h().detach()
            shares.append(float(((h > 0.01) & (h < 0.99)).float().mean()))
        fold(module)

    monkeypatch.setattr(recon, "fold_rounding", spy)
    run_recon(_quantized(), list(_smooth(16).split(8)), config)
    return max(shares)


def test_the_rounding_is_settled_before_it_is_folded(monkeypatch) -> None:
    """The soft decisions trained are the hard ones kept: the rounding's constant rate lets the regularizer finish."""
    config = dataclasses.replace(SMALL, iterations=300, lr_rounding=0.05)
    assert _undecided_share_at_fold(monkeypatch, config) < 0.005
    cosine = dataclasses.replace(config, rounding_schedule="cosine")
    assert _undecided_share_at_fold(monkeypatch, cosine) > 0.05  # the schedule that left them half-trained


def test_recon_config_rejects_an_unknown_rounding_schedule() -> None:
    with pytest.raises(SrquantError, match="rounding_schedule"):
        ReconConfig(rounding_schedule="linear")


def test_dqc_before_the_blocks_trains_every_bound_from_dobi_against_the_float_network(
    monkeypatch, noise_images
) -> None:  # noqa: ANN001
    folder = noise_images(4, 32)
    seen: dict[str, object] = {}

    def spy_dqc(model, draw, config, progress=False, params=None, teacher=None):  # noqa: ANN001, ANN202
        seen.update(iterations=config.iterations, params=params, blocks_done=seen.get("blocks", 0))
        seen["weights_float"] = all(q.rounding is None for n, q in quantizers(model) if is_weight_quantizer(n))
        probe = _smooth(1, seed=4)
        with torch.no_grad(), fp_mode(model):
            seen["teacher_is_float_network"] = torch.equal(teacher(probe), model(probe))
        return run_dqc(model, draw, config, progress, params, teacher)

    def spy_recon(model, batches, config, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen["blocks"] = 1
        return []

    monkeypatch.setattr(recon, "run_dqc", spy_dqc)
    monkeypatch.setattr(recon, "run_recon", spy_recon)
    model = build_model("imdn", 2, tiny=True).eval()
    settings = dict(calib_count=4, calib_size=8, dqc_iterations=2, dqc_batch=2, dqc_crop=8, e2e_iterations=0)
    quantize_model(model, REGISTRY["imdn"].layout, "recon", QuantSpec(4, 4), folder, "cpu", **settings)
    assert seen["iterations"] == 2 and seen["params"] is None  # None: every bound, weights' and activations'
    assert seen["blocks_done"] == 0 and seen["teacher_is_float_network"] and seen["weights_float"]
    assert seen["blocks"] == 1


def test_a_block_that_raises_the_output_error_on_the_check_crops_goes_back(monkeypatch) -> None:  # noqa: ANN001
    def spoil(block, quantized, float_data, config, generator, label, progress=False):  # noqa: ANN001, ANN202
        if label.endswith("IMDB2"):
            with torch.no_grad():
                for p in block.parameters():
                    p.mul_(-3.0)
        return []

    monkeypatch.setattr(recon, "reconstruct_block", spoil)
    batches, check = list(_smooth(16).split(8)), [_smooth(8, seed=7)]
    guarded = _quantized()
    untouched = {k: v.clone() for k, v in guarded.get_submodule("IMDB2").state_dict().items()}
    notes = run_recon(guarded, batches, SMALL, check=check)
    assert any("IMDB2: kept as it was" in n for n in notes) and not any("IMDB1" in n for n in notes)
    kept = guarded.get_submodule("IMDB2").state_dict()
    assert all(torch.equal(kept[k], v) for k, v in untouched.items())
    unguarded = _quantized()
    run_recon(unguarded, batches, SMALL)
    assert not torch.equal(unguarded.get_submodule("IMDB2").state_dict()["c1.weight"], untouched["c1.weight"])


def test_end_to_end_ranges_that_raise_the_held_out_error_are_put_back(monkeypatch) -> None:  # noqa: ANN001
    def spoil(model, draw, config, progress=False, params=None, teacher=None):  # noqa: ANN001, ANN202
        with torch.no_grad():
            for p in params:
                p.mul_(4.0)
        return DQCReport()

    monkeypatch.setattr(recon, "run_dqc", spoil)
    config = dataclasses.replace(SMALL, iterations=5, e2e_iterations=3, e2e_batch=2)
    batches, held_out = list(_smooth(16).split(8)), [_smooth(8, seed=7)]

    def bounds(model: torch.nn.Module) -> list[torch.Tensor]:
        return [p.detach().clone() for n, q in quantizers(model) if not is_weight_quantizer(n) for p in q.parameters()]

    guarded = _quantized()
    run_recon(guarded, batches, dataclasses.replace(config, e2e_iterations=0))
    before = bounds(guarded)
    notes = distil_ranges(guarded, lambda n: _smooth(n, seed=5), config, float_teacher(_quantized()), held_out)
    assert any("end-to-end ranges undone" in n for n in notes)
    assert all(torch.equal(a, b) for a, b in zip(bounds(guarded), before, strict=True))
    unguarded = _quantized()
    run_recon(unguarded, batches, dataclasses.replace(config, e2e_iterations=0))
    distil_ranges(unguarded, lambda n: _smooth(n, seed=5), config, float_teacher(_quantized()))
    assert not all(torch.equal(a, b) for a, b in zip(bounds(unguarded), before, strict=True))


def test_recon_config_rejects_a_negative_held_out_count() -> None:
    with pytest.raises(SrquantError, match="e2e_check_count"):
        ReconConfig(e2e_check_count=-1)
