"""Methods are plugins: a method written only in this file runs through the CLI and the API like a built-in one,
its state survives the checkpoint, and its model is evaluated through its own hooks."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import srquant
from srquant.cli import main
from srquant.errors import SrquantError
from srquant.methods.base import CalibrationData, Method, MethodRun
from srquant.methods.ptq import calibrate
from srquant.methods.registry import register_method, unregister_method
from srquant.models.layout import QuantLayout
from srquant.quant.quantize import quantize_
from srquant.quant.spec import QuantSpec


@dataclass(frozen=True)
class ToyConfig:
    """How many calibration crops the toy method draws."""

    crops: int = 4
    seed: int = 0


class Gain(nn.Module):
    """The toy method's inference model: the quantized network, its output scaled by a calibrated gain."""

    def __init__(self, network: nn.Module, gain: torch.Tensor) -> None:
        super().__init__()
        self.network, self.scale = network, int(network.scale)
        self.register_buffer("gain", gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x) * self.gain

    def image_metrics(self, lr: torch.Tensor) -> dict[str, float]:
        return {"gain": float(self.gain)}


class ToyMinMax(Method):
    """MinMax ranges, then a 'gain' the method keeps in its own checkpoint state."""

    name = "toy-minmax"
    summary = "a test method: MinMax ranges and a saved gain"
    config_type = ToyConfig
    presets = {"cpu": ToyConfig(), "paper": ToyConfig(crops=8)}

    def run(
        self,
        model: nn.Module,
        layout: QuantLayout,
        spec: QuantSpec,
        data: CalibrationData,
        config: ToyConfig,
        progress: bool = False,
    ) -> MethodRun:
        report = quantize_(model, spec, layout)
        calibrate(model, data.batches(config.crops, 32, 2, config.seed), "minmax")
        state = {"gain": torch.tensor(1.0)}
        return MethodRun(Gain(model, state["gain"]), report, spec, 0.0, {"crops": config.crops}, state)

    def inference_model(self, network: nn.Module, state: dict[str, Any] | None) -> nn.Module:
        assert state is not None
        return Gain(network, state["gain"])


@pytest.fixture
def toy() -> Iterator[ToyMinMax]:
    method = register_method(ToyMinMax())
    try:
        yield method
    finally:
        unregister_method(method.name)


def test_a_registered_method_runs_through_the_cli(toy: ToyMinMax, assets: Path, tmp_path: Path, capsys) -> None:
    assert main(["methods"]) == 0
    assert "toy-minmax" in capsys.readouterr().out
    out, report = tmp_path / "toy.pt", tmp_path / "r.json"
    argv = ["quantize", "--model", "imdn", "--scale", "4", "--method", "toy-minmax", "--wbits", "8", "--abits", "8"]
    assert main(argv + ["-o", str(out), "--assets", str(assets), "--no-progress", "--device", "cpu"]) == 0
    argv = ["eval", "--model", str(out), "--scale", "4", "--datasets", "Set5", "--assets", str(assets)]
    assert main(argv + ["--json", str(report), "--no-progress", "--device", "cpu"]) == 0
    row = json.loads(report.read_text())["results"][0]
    assert row["gain"] == 1.0  # the toy model's own per-image measurement reached the report
    assert 30.0 < row["psnr"] < 32.3 and (row["wbits"], row["abits"]) == (8, 8)
    loaded = srquant.load_quantized(out)  # the API loads it through the method's hooks too
    assert isinstance(loaded, Gain) and float(loaded.gain) == 1.0
    with pytest.raises(SrquantError, match="no preset 'gpu'"):
        srquant.quantize("imdn", 4, "toy-minmax", 8, 8, preset="gpu", assets=assets)


def test_a_method_name_is_registered_once(toy: ToyMinMax) -> None:
    with pytest.raises(SrquantError, match="already registered"):
        register_method(ToyMinMax())
    assert "toy-minmax" in srquant.method_names()
