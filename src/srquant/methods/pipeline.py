"""One call from a float network to a calibrated quantized one, and the checkpoint that keeps it.

`quantize_model` looks the method up in the registry, builds its config from a preset and overrides, and runs
it; `save_quantized` / `load_quantized` write and read the result through the method's own hooks, so the
reloaded model computes what the saved one computed (dynamic bit controllers included), on any device.
Nothing here knows any particular method.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from srquant.errors import SrquantError
from srquant.methods.base import CalibrationData
from srquant.methods.registry import get_method
from srquant.models.layout import QuantLayout
from srquant.models.registry import architecture_record, build_from_record, check_finite, layout_of
from srquant.outputs import atomic_write
from srquant.quant.checkpoint import FORMAT, network_state, read_record, restore_network
from srquant.quant.quantize import QuantReport
from srquant.quant.spec import QuantSpec


@dataclass
class QuantizationResult:
    """A quantized model and how it was made (for the checkpoint and for reports).

    `model` is what to evaluate (the network, or a wrapper that runs it with a dynamic method's bits);
    `network` is the quantized network itself.
    """

    model: nn.Module
    network: nn.Module
    method: str
    spec: QuantSpec
    preset: str
    report: QuantReport
    calib_seconds: float
    settings: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] | None = None
    rollbacks: list[str] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    calib_folder: str = ""
    inferred: Any = None  # the layout srquant inferred for a network outside the zoo (InferredLayout), if any

    def meta(self) -> dict[str, Any]:
        """What the checkpoint records about the run."""
        return {
            "method": self.method,
            "preset": self.preset,
            "calib_folder": self.calib_folder,
            "calib_seconds": self.calib_seconds,
            "settings": self.settings,
            "quantized": self.report.summary(),
            "rollbacks": self.rollbacks,
        }

    def save(self, path: str | Path, meta: Mapping[str, Any] | None = None) -> int:
        """Write the quantized checkpoint atomically; returns its size in bytes."""
        return save_quantized(self.network, path, self.method, self.spec, {**self.meta(), **(meta or {})}, self.state)


def check_input_granularity(method: str, act_granularity: str, layout: QuantLayout | None = None) -> None:
    """Refuse per-part input grids where they cannot work: a dynamic method (its bits change per image or patch,
    its quantizers take one grid per input), or a layout that lists no concatenated inputs."""
    if act_granularity == "tensor":
        return
    if get_method(method).dynamic:
        raise SrquantError(f"act_granularity {act_granularity!r} needs a fixed-bit method: {method}'s bits change")
    if layout is not None and not layout.input_parts:
        raise SrquantError(
            f"act_granularity {act_granularity!r}: the layout lists no concatenated inputs (`input_parts`) to split"
        )


def quantize_model(
    model: nn.Module,
    layout: QuantLayout,
    method: str,
    spec: QuantSpec,
    calib_folder: str | Path,
    preset: str = "cpu",
    datasets_root: Path | None = None,
    progress: bool = False,
    **overrides: Any,
) -> QuantizationResult:
    """Quantize a float network in place by a registered method; calibration crops come from `calib_folder`
    (never a benchmark set), on the network's device."""
    plugin = get_method(method)
    config = plugin.config(preset, overrides)
    check_input_granularity(method, spec.act_granularity, layout)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    data = CalibrationData(
        Path(calib_folder), int(model.scale), device, datasets_root, int(getattr(model, "pad_multiple", 1))
    )
    run = plugin.run(model, layout, spec, data, config, progress)
    return QuantizationResult(
        run.model,
        model,
        plugin.name,
        run.spec,
        preset,
        run.report,
        run.seconds,
        run.settings,
        run.state,
        run.rollbacks,
        run.losses,
        str(calib_folder),
    )


def save_quantized(
    network: nn.Module,
    path: str | Path,
    method: str,
    spec: QuantSpec,
    meta: Mapping[str, Any],
    state: Mapping[str, Any] | None = None,
) -> int:
    """Write a quantized network, its method and the method's state to `path` atomically; returns the size.

    Packed weight codes are written from the CPU; the network stays where it is.
    """
    record = {
        "format": FORMAT,
        "arch": architecture_record(network),
        "model": architecture_record(network).get("name"),
        "scale": int(network.scale),
        "method": method,
        "spec": spec.to_dict(),
        "network": network_state(network),
        "method_state": _to_cpu(dict(state)) if state is not None else None,
        "meta": dict(meta),
    }
    path = atomic_write(path, lambda tmp: torch.save(record, tmp))
    return path.stat().st_size


def _to_cpu(value: Any) -> Any:
    """A nested record with every tensor moved to the CPU (checkpoints load on any device)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, Mapping):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_cpu(v) for v in value)
    return value


@dataclass
class LoadedCheckpoint:
    """A loaded quantized checkpoint: the model to evaluate, the network inside it, and the file's record."""

    model: nn.Module
    network: nn.Module
    record: dict[str, Any]

    @property
    def method(self) -> str:
        """The method that made it."""
        return str(self.record["method"])

    @property
    def scale(self) -> int:
        """Its upscaling factor."""
        return int(self.record["scale"])

    def label(self, path: str | Path) -> str:
        """`<network> (<file>, <method>)` for printouts."""
        arch = self.record["arch"]
        return f"{arch.get('name') or arch.get('class', '?')} ({Path(path).name}, {self.method})"


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> LoadedCheckpoint:
    """Read a quantized checkpoint onto `device`: rebuild the network, the method's quantizers and state."""
    try:
        return _load(path, device)
    except (KeyError, TypeError, AttributeError) as err:
        raise SrquantError(f"{path} is not a complete srquant checkpoint (cannot read {err})") from None


def _load(path: str | Path, device: torch.device | str) -> LoadedCheckpoint:
    record = read_record(path, "cpu")
    plugin = get_method(str(record["method"]))
    network = build_from_record(record["arch"]).to(device).eval()
    layout = layout_of(network)
    spec = QuantSpec.from_dict(record["spec"])
    state = _to_device(record.get("method_state"), device)
    plugin.rebuild(network, layout, spec, state)
    restore_network(network, record["network"], str(path))
    model = plugin.inference_model(network.eval(), state)
    check_finite(model, str(path))
    return LoadedCheckpoint(model.eval(), network, record)


def _to_device(value: Any, device: torch.device | str) -> Any:
    """A nested record with every tensor moved to a device."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_device(v, device) for v in value)
    return value


def load_quantized(path: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """The model a quantized checkpoint holds, on `device`, computing exactly what `srquant eval --model PATH`
    evaluates (a dynamic method's bit controller included)."""
    return load_checkpoint(path, device).model
