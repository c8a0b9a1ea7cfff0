"""Dynamic-bit models through checkpoints and evaluation: AdaBM's bit state survives save/load exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import srquant
from srquant.cli import main
from srquant.errors import SrquantError
from srquant.methods.adabm import ADABM, run_adabm
from srquant.methods.controls import content_uniform, draw_from_histogram
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


def test_content_uniform_is_deterministic_per_content_and_seed() -> None:
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    u = content_uniform(x, 0)
    assert u.shape == (3,) and bool(((u >= 0) & (u < 1)).all())
    assert torch.equal(u, content_uniform(x.clone(), 0))  # the same content, the same number
    assert torch.equal(content_uniform(x[1:2], 0), u[1:2])  # independent of the batch it is in
    assert not torch.equal(u, content_uniform(x, 1))


def test_draw_from_histogram_follows_the_shares() -> None:
    u = torch.arange(1000, dtype=torch.float64) / 1000
    drawn = draw_from_histogram(u, {4: 1, 5: 1, 8: 2})
    assert [int((drawn == b).sum()) for b in (4, 5, 8)] == [250, 250, 500]
    with pytest.raises(SrquantError, match="histogram"):
        draw_from_histogram(u, {})


def _tiny_adabm(tmp_path: Path) -> tuple[Path, object]:
    """A tiny EDSR x2 AdaBM checkpoint with both adaptations and the measured allocation off (paper rules)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    network = build_model("edsr-baseline", 2, tiny=True).eval()
    config = ADABM.config("paper", {"epochs": 1, "iterations": 1, "calib_count": 4, "calib_batch": 2, "crop": 12})
    draw = lambda n: torch.rand(n, 3, 12, 12, generator=gen)  # noqa: E731
    result = run_adabm(network, REGISTRY["edsr-baseline"].layout, QuantSpec(4, 4), draw, config)
    path = tmp_path / "adabm.pt"
    save_quantized(network, path, "adabm", result.spec, {}, {"controller": result.controller.state_dict()})
    return path, result


def test_adabm_random_control_shuffles_layer_bits_and_draws_image_bits_by_the_shares(tmp_path: Path) -> None:
    path, result = _tiny_adabm(tmp_path)
    control = srquant.api.random_control(path, {-1: 1, 1: 1}, seed=3, device="cpu")
    fitted = result.controller
    x = torch.rand(6, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        mine, theirs = control.controller.layer_bits(), fitted.layer_bits()
        assert sorted(mine.tolist()) == sorted(theirs.tolist())  # the same layer histogram
        image = control.controller.image_bits(x)
        assert set(image.tolist()) <= {-1.0, 1.0}
        again = srquant.api.random_control(path, {-1: 1, 1: 1}, seed=3, device="cpu")
        assert torch.equal(again(x), control(x))  # deterministic across loads
        only_zero = srquant.api.random_control(path, {0: 1}, seed=3, device="cpu")
        assert only_zero.controller.image_bits(x).abs().sum() == 0


def test_random_control_refuses_a_fixed_bit_checkpoint(tmp_path: Path) -> None:
    network = build_model("pan", 2, tiny=True).eval()
    from srquant.methods.ptq import calibrate
    from srquant.quant.quantize import quantize_

    quantize_(network, QuantSpec(4, 4), REGISTRY["pan"].layout)
    calibrate(network, [torch.rand(2, 3, 12, 12)], "minmax")
    save_quantized(network, tmp_path / "q.pt", "minmax", QuantSpec(4, 4), {})
    with pytest.raises(srquant.SrquantError, match="dynamic"):
        srquant.api.random_control(tmp_path / "q.pt", {4: 1}, device="cpu")


def test_no_adapt_is_refused_for_a_fixed_bit_method_and_gives_fixed_twins() -> None:
    from srquant.methods.registry import get_method

    assert get_method("adabm").fixed_twin(4) == {"image2bit": False, "layer2bit": False}
    assert get_method("granular-dq").fixed_twin(5) == {"fixed_bits": 5}
    with pytest.raises(srquant.SrquantError, match="dynamic methods"):
        get_method("dobi").fixed_twin(4)
