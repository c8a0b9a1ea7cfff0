"""Dynamic-bit models through checkpoints and evaluation: AdaBM's bit state survives save/load exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import srquant
from srquant.cli import main
from srquant.methods.adabm import ADABM, run_adabm
from srquant.methods.pipeline import load_quantized, save_quantized
from srquant.models.registry import REGISTRY, build_model
from srquant.quant.spec import QuantSpec

pytestmark = pytest.mark.usefixtures("one_thread")


def test_adabm_checkpoint_reloads_bits_and_outputs_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    network = build_model("edsr-baseline", 2, tiny=True).eval()
    config = ADABM.config("cpu", {"epochs": 3, "iterations": 2, "calib_count": 4, "calib_batch": 2, "crop": 12})
    result = run_adabm(
        network,
        REGISTRY["edsr-baseline"].layout,
        QuantSpec(4, 4),
        lambda n: torch.rand(n, 3, 12, 12, generator=gen),
        config,
    )
    path = tmp_path / "adabm.pt"
    save_quantized(network, path, "adabm", result.spec, {}, {"controller": result.controller.state_dict()})
    again = srquant.load_quantized(path)  # what `srquant eval --model` evaluates, controller included
    flat, busy = torch.full((1, 3, 16, 16), 0.5), torch.rand(1, 3, 16, 16, generator=gen)
    with torch.no_grad():
        for x in (flat, busy, torch.cat([flat, busy])):
            assert torch.equal(result.model(x), again(x))
            assert torch.equal(result.controller(x), again.controller(x))
        assert again.image_metrics(busy)["fab"] == pytest.approx(float(again.controller(busy).mean()))


def test_a_fixed_bit_checkpoint_loads_as_the_network_itself(tmp_path: Path) -> None:
    torch.manual_seed(0)
    network = build_model("pan", 2, tiny=True).eval()
    from srquant.methods.ptq import calibrate
    from srquant.quant.quantize import quantize_

    quantize_(network, QuantSpec(4, 4), REGISTRY["pan"].layout)
    calibrate(network, [torch.rand(2, 3, 12, 12)], "minmax")
    save_quantized(network, tmp_path / "q.pt", "minmax", QuantSpec(4, 4), {})
    again = load_quantized(tmp_path / "q.pt")
    assert type(again) is type(network) and not hasattr(again, "image_metrics")


def test_cli_adabm_on_a_real_network(assets: Path, tmp_path: Path) -> None:
    out, report, bits = tmp_path / "imdn_adabm.pt", tmp_path / "r.json", tmp_path / "bits.json"
    argv = ["quantize", "--model", "imdn", "--scale", "4", "--method", "adabm", "--wbits", "4", "--abits", "6"]
    assert main(argv + ["--iterations", "1", "-o", str(out), "--assets", str(assets), "--no-progress"]) == 0
    argv = ["eval", "--model", str(out), "--scale", "4", "--datasets", "Set5", "--assets", str(assets)]
    assert main(argv + ["--json", str(report), "--bits-json", str(bits), "--no-progress"]) == 0
    row = json.loads(report.read_text())["results"][0]
    assert 4.0 <= row["fab"] <= 8.0 and row["bitops_g"] > 0 and row["psnr"] > 20
    per_image = json.loads(bits.read_text())["Set5"]
    assert sorted(per_image) == ["baby", "bird", "butterfly", "head", "woman"]
    assert all(len(entry["layers"]) == 30 for entry in per_image.values())  # IMDN's 30 adaptive body convs
    mean_fab = sum(entry["fab"] for entry in per_image.values()) / 5
    assert mean_fab == pytest.approx(row["fab"])
