"""2DQuant's DQC and the quantization pipeline on tiny models; the CLI round trip on a real network."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from srquant.cli import main
from srquant.methods.pipeline import quantize_model
from srquant.methods.ptq import calibrate
from srquant.methods.registry import get_method
from srquant.methods.training import normalised_feature_distance
from srquant.methods.twodquant import TwoDQuantConfig, run_dqc
from srquant.models.registry import REGISTRY, build_model
from srquant.quant.quantize import bound_parameters, quantize_, quantizers
from srquant.quant.spec import QuantSpec


def _calibrated(name: str = "swinir-light", bits: int = 3) -> torch.nn.Module:
    """A tiny x2 model quantized at W{bits}A{bits} and DOBI-calibrated on random crops."""
    torch.manual_seed(0)
    model = build_model(name, 2, tiny=True).eval()
    quantize_(model, QuantSpec(bits, bits), REGISTRY[name].layout)
    calibrate(model, [torch.rand(4, 3, 16, 16)], "dobi")
    return model


def _sampler(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return lambda n: torch.rand(n, 3, 16, 16, generator=gen)


def test_dqc_trains_only_bounds_and_lowers_the_loss() -> None:
    model = _calibrated()
    weights = {k: v.clone() for k, v in model.state_dict().items() if "bound" not in k}
    report = run_dqc(model, _sampler(), TwoDQuantConfig(iterations=30, batch_size=2, lr=1e-2, augment=False))
    assert len(report.losses) == 30 and not report.rollbacks
    assert np.mean(report.losses[-5:]) < np.mean(report.losses[:5])
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in weights.items())  # network weights untouched


def test_divergence_guard_rolls_back_to_the_last_good_bounds() -> None:
    model = _calibrated()
    inputs = _sampler()
    calls = {"n": 0}

    def poisoned(n: int) -> torch.Tensor:
        calls["n"] += 1
        batch = inputs(n)
        if calls["n"] in (8, 9):
            batch[0, 0, 0, 0] = float("nan")  # the loss turns NaN on these steps
        return batch

    report = run_dqc(model, poisoned, TwoDQuantConfig(iterations=12, batch_size=2, augment=False))
    assert len(report.rollbacks) == 2 and "lr halved" in report.rollbacks[0]
    assert all(torch.isfinite(p).all() for p in bound_parameters(model))
    with torch.no_grad():
        assert torch.isfinite(model(torch.rand(1, 3, 16, 16))).all()


def test_loss_blow_up_trips_the_guard_and_restores_the_bounds() -> None:
    model = _calibrated("edsr-baseline")  # a CNN: its body convs drive the output even with random weights
    inputs_q = [q for name, q in quantizers(model) if name.endswith("input_quantizer")]
    inputs = _sampler()
    calls = {"n": 0}

    def runaway(n: int) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 10:  # as if the last optimizer step had thrown the bounds far out
            with torch.no_grad():
                for q in inputs_q:
                    q.lower_bound.fill_(-1e6)
                    q.upper_bound.fill_(1e6)
        return inputs(n)

    report = run_dqc(model, runaway, TwoDQuantConfig(iterations=12, batch_size=2, augment=False))
    # Draws 1-4 seed the guard's history, so draw 10 is step 5.
    assert len(report.rollbacks) == 1 and report.rollbacks[0].startswith("step 5:")
    # EDSR works on a 0..255 scale: restored bounds are of that order, far from the corrupted +-1e6.
    assert all(q.upper_bound.abs().item() < 1e4 and q.lower_bound.abs().item() < 1e4 for q in inputs_q)


def test_feature_distance_normalises_each_sample_separately() -> None:
    a = torch.rand(3, 5, 4)
    # Scaling one sample's features must not change the distance (per-sample normalisation), and the
    # result is a scalar (no batch-by-batch broadcast).
    b = a.clone()
    b[1] *= 7.0
    assert normalised_feature_distance(a, b).shape == ()
    assert normalised_feature_distance(a, b) == pytest.approx(0.0, abs=1e-12)


def test_pipeline_runs_2dquant_on_a_folder(noise_images: Callable[..., Path]) -> None:
    folder = noise_images(3, 160)
    model = build_model("lmlt-tiny", 2, tiny=True).eval()
    result = quantize_model(
        model,
        REGISTRY["lmlt-tiny"].layout,
        "2dquant",
        QuantSpec(4, 4),
        folder,
        "cpu",
        calib_count=4,
        calib_size=8,
        iterations=3,
        batch_size=2,
        crop=8,
    )
    assert len(result.losses) == 3
    assert result.settings["calib_size"] == 64  # rounded up to LMLT's padding multiple
    assert result.calib_seconds > 0


def test_presets() -> None:
    method = get_method("2dquant")
    paper, code = method.config("paper"), method.config("code")
    assert (paper.iterations, paper.batch_size, paper.schedule) == (3000, 32, "cosine")
    assert (code.iterations, code.batch_size, code.betas) == (4000, 16, (0.9, 0.99))
    assert method.config("cpu", {"iterations": 7}).iterations == 7
    # The papers' presets keep the papers' per-tensor weights; srquant's own recipes use per-channel ones.
    assert method.default_granularity("paper") == method.default_granularity("code") == "tensor"
    assert method.default_granularity("cpu") == method.default_granularity("gpu") == "channel"


def test_cli_quantize_and_eval_a_real_network(assets: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out, report = tmp_path / "imdn_w8a8.pt", tmp_path / "r.json"
    argv = ["quantize", "--model", "imdn", "--scale", "4", "--method", "minmax", "--wbits", "8", "--abits", "8"]
    assert main(argv + ["-o", str(out), "--assets", str(assets), "--no-progress"]) == 0
    assert "calibration took" in capsys.readouterr().out
    argv = ["eval", "--model", str(out), "--scale", "4", "--datasets", "Set5", "--assets", str(assets)]
    assert main(argv + ["--json", str(report), "--no-progress"]) == 0
    row = json.loads(report.read_text())["results"][0]
    assert (row["wbits"], row["abits"]) == (8, 8)
    assert 0 < row["size_mb"] < 2.9 and 0 < row["bitops_g"] < 41.1  # below the float IMDN's 2.86 MB / 41.1 G
    assert 31.0 < row["psnr"] <= 32.22  # W8A8 stays close to the FP 32.21 dB
