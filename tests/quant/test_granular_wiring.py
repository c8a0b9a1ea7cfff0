"""Granular-DQ through the pipeline, checkpoints, evaluation and the CLI: bits and outputs survive save/load."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import srquant.methods.granular_dq as granular_dq
from srquant import api
from srquant.cli import main
from srquant.data.benchmark import BenchmarkSet
from srquant.data.io import read_image, write_image
from srquant.errors import SrquantError
from srquant.evaluate import evaluate_dataset
from srquant.methods.granular_dq import (
    GranularDQConfig,
    MultiBitLSQ,
    PatchwiseBitsModel,
    checkpoint_state,
    patch_entropy,
    run_granular_dq,
    upscale_patchwise,
)
from srquant.methods.pipeline import load_checkpoint, quantize_model, save_quantized
from srquant.methods.registry import method_names
from srquant.models.registry import build_model, get_entry
from srquant.quant.spec import QuantSpec

SMALL = GranularDQConfig(
    iterations=3,
    batch_size=2,
    patch=16,
    lr_milestones=(),
    epoch_iterations=2,
    calib_count=8,
    calib_batch=4,
    guard_seed_batches=2,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _image(gen: torch.Generator, h: int, w: int) -> torch.Tensor:
    """A 1x3xHxW image with flat and busy regions, so patches get different bits."""
    base = F.interpolate(torch.rand(1, 3, 4, 4, generator=gen), size=(h, w), mode="bilinear")
    amount = torch.linspace(0, 0.6, w).view(1, 1, 1, w)
    return (base + amount * (torch.rand(1, 3, h, w, generator=gen) - 0.5)).clamp(0, 1)


def _draw(gen: torch.Generator):
    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        lr = torch.cat([_image(gen, 16, 16) for _ in range(n)])
        return lr, F.interpolate(lr, scale_factor=2, mode="bicubic", align_corners=False).clamp(0, 1)

    return draw


def _quantized(config: GranularDQConfig = None):  # type: ignore[assignment]
    """A tiny Granular-DQ IMDN x2 (QAT: weights move too), trained with its controller attached."""
    torch.manual_seed(0)
    model = build_model("imdn", 2, tiny=True).eval()
    return model, run_granular_dq(model, get_entry("imdn").layout, _draw(torch.Generator().manual_seed(1)), config)


@pytest.fixture
def saved(tmp_path: Path):
    """A tiny Granular-DQ IMDN x2 and its checkpoint."""
    model, result = _quantized(SMALL)
    path = tmp_path / "gdq.pt"
    save_quantized(model, path, "granular-dq", result.spec, {}, checkpoint_state(model, result))
    return model, result, path


def test_granular_checkpoint_reloads_bits_and_outputs_exactly(saved) -> None:
    model, result, path = saved
    loaded = load_checkpoint(path)
    wrapper, again = loaded.model, loaded.network
    assert isinstance(wrapper, PatchwiseBitsModel) and not wrapper.controller.training
    controller = wrapper.controller
    assert loaded.record["method_state"]["head"] == result.head
    assert controller.layer_names == result.controller.layer_names
    assert torch.equal(controller.thresholds, result.controller.thresholds)
    for name in result.layers:
        old, new = model.get_submodule(name).input_quantizer, again.get_submodule(name).input_quantizer
        assert isinstance(new, MultiBitLSQ) and new.signed == old.signed
        assert new.candidate_bits == old.candidate_bits
    gen = torch.Generator().manual_seed(5)
    image = _image(gen, 40, 52)
    with torch.no_grad():
        batch = torch.cat([_image(gen, 16, 16) for _ in range(6)])
        assert torch.equal(model(batch), again(batch))
        assert torch.equal(result.controller.last_bits, controller.last_bits)
        sr_a, bits_a = upscale_patchwise(model, result.controller, image, patch=16, step=12)
        sr_b, bits_b = upscale_patchwise(again, controller, image, patch=16, step=12)
    assert torch.equal(sr_a, sr_b) and bits_a == bits_b
    assert all(p.bit in (4, 5, 6, 8) for p in bits_b)


def test_a_granular_checkpoint_without_its_state_is_refused(saved, tmp_path: Path) -> None:
    model, result, _ = saved
    path = tmp_path / "bare.pt"
    save_quantized(model, path, "granular-dq", result.spec, {}, None)
    with pytest.raises(SrquantError, match="must hold its controller"):
        load_checkpoint(path)


def test_evaluate_patchwise_reports_mean_patch_bit(saved, tmp_path: Path) -> None:
    _, _, path = saved
    model = load_checkpoint(path).model
    model.patch, model.stride = 16, 12
    gen = torch.Generator().manual_seed(3)
    hr_dir = tmp_path / "toy" / "HR"
    for name in ("a", "b"):
        hr = F.interpolate(_image(gen, 40, 52), scale_factor=2, mode="bilinear").clamp(0, 1)
        write_image(hr_dir / f"{name}.png", (hr[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    dataset = BenchmarkSet("toy", hr_dir, tmp_path / "cache")
    log: dict[str, dict[str, object]] = {}
    calls = []
    model.network.register_forward_pre_hook(lambda _m, args: calls.append(0 if args[0].is_meta else args[0].shape[0]))

    def per_image(name: str, lr: torch.Tensor) -> dict[str, float]:
        log[name] = model.image_record(lr)
        write_image(tmp_path / "maps" / f"{name}.png", model.bit_map(lr))
        return model.image_metrics(lr)

    (res,) = evaluate_dataset(model, dataset, 2, progress=False, per_image=per_image)
    patches = {name: entry["patches"] for name, entry in log.items()}
    assert sorted(patches) == ["a", "b"]
    assert sum(calls) == sum(len(p) for p in patches.values())  # each patch ran once: measuring runs nothing
    for name, items in patches.items():
        assert log[name]["fab"] == pytest.approx(sum(p["bit"] for p in items) / len(items))
        assert read_image(tmp_path / "maps" / f"{name}.png").shape == (40, 52, 3)
    assert res.extras["fab"] == pytest.approx((log["a"]["fab"] + log["b"]["fab"]) / 2)
    assert res.extras["bitops_g"] > 0 and res.psnr > 0
    (default,) = evaluate_dataset(model, dataset, 2, progress=False)  # the model measures itself by default
    assert default.extras == pytest.approx(res.extras) and default.psnr == res.psnr


def test_cli_granular_dq_on_a_real_network(assets: Path, tmp_path: Path) -> None:
    assert "granular-dq" in method_names()
    out, report, bits, maps = tmp_path / "imdn_gdq.pt", tmp_path / "r.json", tmp_path / "bits.json", tmp_path / "m"
    argv = ["quantize", "--model", "imdn", "--scale", "4", "--method", "granular-dq", "--wbits", "8", "--abits", "8"]
    assert main(argv + ["--iterations", "1", "-o", str(out), "--assets", str(assets), "--no-progress"]) == 0
    argv = ["eval", "--model", str(out), "--scale", "4", "--datasets", "Set5", "--assets", str(assets)]
    argv += ["--json", str(report), "--bits-json", str(bits), "--bitmap-dir", str(maps), "--no-progress"]
    assert main(argv) == 0
    row = json.loads(report.read_text())["results"][0]
    assert 4.0 <= row["fab"] <= 8.0 and row["bitops_g"] > 0 and row["psnr"] > 20
    per_image = json.loads(bits.read_text())["Set5"]
    assert sorted(per_image) == ["baby", "bird", "butterfly", "head", "woman"]
    for name, entry in per_image.items():
        assert entry["fab"] == pytest.approx(sum(p["bit"] for p in entry["patches"]) / len(entry["patches"]))
        assert (maps / "Set5" / f"{name}.png").is_file()
    assert sum(entry["fab"] for entry in per_image.values()) / 5 == pytest.approx(row["fab"])
    (same,) = api.evaluate_model(out, 4, ["Set5"], assets=assets, device="cpu").results  # the same via the API
    assert {k: same.extras[k] for k in ("fab", "bitops_g")} == pytest.approx(
        {"fab": row["fab"], "bitops_g": row["bitops_g"]}
    )
    assert same.psnr == pytest.approx(row["psnr"])


@pytest.mark.parametrize(
    "switches", [{"fixed_bits": 4}, {"e2b": False, "atc": False}, {"atc": False}], ids=["fixed4", "gbc", "e2b"]
)
def test_switches_survive_save_and_load(switches: dict, tmp_path: Path) -> None:
    config = dataclasses.replace(SMALL, **switches)
    model, result = _quantized(config)
    path = tmp_path / "gdq.pt"
    save_quantized(model, path, "granular-dq", result.spec, {}, checkpoint_state(model, result))
    loaded = load_checkpoint(path)
    again, controller, record = loaded.network, loaded.model.controller, loaded.record
    mine = result.controller
    assert (controller.use_e2b, controller.use_atc, controller.fixed_bits) == (
        mine.use_e2b,
        mine.use_atc,
        mine.fixed_bits,
    )
    assert (controller.use_e2b, controller.use_atc) == (config.e2b, config.atc)
    state = record["method_state"]
    assert controller.fixed_bits == config.fixed_bits and state["config"]["fixed_bits"] == config.fixed_bits
    assert all(layer["bits"] == list(config.candidate_bits) for layer in state["layers"])
    image = _image(torch.Generator().manual_seed(5), 40, 52)
    sr_a, bits_a = upscale_patchwise(model, mine, image, patch=16, step=12)
    sr_b, bits_b = upscale_patchwise(again, controller, image, patch=16, step=12)
    sr_c, bits_c = upscale_patchwise(again, controller, image, patch=16, step=12)  # test time is deterministic
    assert torch.equal(sr_a, sr_b) and bits_a == bits_b and torch.equal(sr_b, sr_c) and bits_b == bits_c
    used = {p.bit for p in bits_b}
    assert used == {4} if config.fixed_bits == 4 else used <= ({4, 6, 8} if not config.e2b else {4, 5, 6, 8})


def _calibration_folder(folder: Path, sizes: list[int]) -> Path:
    """HR training images (square, smooth plus noise) of the given sides."""
    gen = torch.Generator().manual_seed(7)
    for i, side in enumerate(sizes):
        img = _image(gen, side, side)[0].permute(1, 2, 0).numpy()
        write_image(folder / f"train{i}.png", (img * 255).round().astype(np.uint8))
    return folder


@pytest.mark.parametrize(("sides", "expected"), [([400, 400, 400], 96), ([400, 360, 360, 360], 88)])
def test_pipeline_calibrates_thresholds_on_test_sized_patches(
    sides: list[int], expected: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    drawn: list[torch.Tensor] = []
    real = granular_dq.run_granular_dq

    def spy(*args: object, draw_entropy_batch: Callable[[int], torch.Tensor], **kwargs: object) -> object:
        def wrapped(n: int) -> torch.Tensor:
            drawn.append(draw_entropy_batch(n))
            return drawn[-1]

        return real(*args, draw_entropy_batch=wrapped, **kwargs)

    monkeypatch.setattr(granular_dq, "run_granular_dq", spy)
    folder = _calibration_folder(tmp_path / "train", sides)
    torch.manual_seed(0)
    model = build_model("imdn", 4, tiny=True).eval()
    small = {"iterations": 1, "batch_size": 1, "patch": 16, "calib_count": 6, "calib_batch": 3, "guard_seed_batches": 1}
    result = quantize_model(
        model, get_entry("imdn").layout, "granular-dq", QuantSpec(8, 8), folder, "cpu", None, atc=False, **small
    )
    assert result.settings["entropy_patch"] == expected and result.settings["crop"] == 16
    assert [tuple(b.shape) for b in drawn] == [(3, 3, expected, expected)] * 2
    entropies = torch.cat([patch_entropy(b) for b in drawn])
    wanted = torch.quantile(entropies, torch.tensor([0.5, 0.9]))
    thresholds = result.state["controller"]["thresholds"]
    torch.testing.assert_close(thresholds, wanted)  # atc off: still the calibrated ones
