"""What every quantization method is: a named plugin with a config, presets, a run, and its checkpoint hooks.

A method subclasses `Method` and is registered once (`srquant.methods.registry.register_method`). The pipeline,
the checkpoint code and the CLI only talk to this interface, so adding a method is one file and one line:

- `config_type` (a validated dataclass) and `presets` (name -> config): the paper's schedule, the released
  code's, and a CPU-sized one; `config(preset, overrides)` gives the run's config (unknown fields are refused).
- `default_granularity(preset)`: the weight granularity a preset uses when the user names none (the papers'
  presets keep the papers' per-tensor weights).
- `run(model, layout, spec, data, config, progress)`: quantize the float network in place (`quantize_`),
  calibrate or train it from `data`, and return a `MethodRun`.
- `rebuild(network, layout, spec, state)` and `inference_model(network, state)`: loading a checkpoint rebuilds
  the method's quantizer structure, loads the network, then wraps or hooks it as the method evaluates it (a
  dynamic method's bit controller), so a loaded model computes what `srquant eval` evaluates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from srquant.data.calibration import CropSampler
from srquant.data.io import image_size, list_images
from srquant.errors import SrquantError
from srquant.models.layout import QuantLayout
from srquant.quant.quantize import QuantReport, quantize_
from srquant.quant.spec import QuantSpec

PAPER_PRESETS = frozenset({"paper", "code"})
DEFAULT_GRANULARITY = "channel"  # measured better on every W4A4 cell (docs/results/ptq_granularity.md)


@dataclass
class CalibrationData:
    """Where a method draws its crops from: a folder of training images (never a benchmark set) at one scale.

    Crops are rounded up to the network's `pad_multiple` (window transformers pad to it anyway) and placed on
    `device`. Samplers are cached per crop size, so each image is read and downsampled once.
    """

    folder: Path
    scale: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    datasets_root: Path | None = None
    pad_multiple: int = 1
    _samplers: dict[int, CropSampler] = field(default_factory=dict, repr=False)

    def rounded(self, size: int) -> int:
        """A crop size rounded up to the network's padding multiple."""
        return -(-size // self.pad_multiple) * self.pad_multiple

    def sampler(self, size: int) -> CropSampler:
        """The (cached) sampler of LR crops of `size` pixels."""
        if size not in self._samplers:
            self._samplers[size] = CropSampler(self.folder, self.scale, size, self.datasets_root)
        return self._samplers[size]

    def crops(self, count: int, size: int, seed: int) -> torch.Tensor:
        """`count` seeded LR crops (N x 3 x size x size) on the device."""
        lr, _ = self.sampler(size).draw(count, np.random.default_rng(seed))
        return lr.to(self.device)

    def batches(self, count: int, size: int, batch: int, seed: int) -> list[torch.Tensor]:
        """`count` seeded LR crops split into batches of at most `batch`."""
        return list(self.crops(count, size, seed).split(batch))

    def stream(self, size: int, seed: int, with_hr: bool = False) -> Callable[[int], Any]:
        """`draw(n)`: n fresh LR crops (and their HR crops with `with_hr`) on the device, from a seeded stream."""
        sampler, rng = self.sampler(size), np.random.default_rng(seed)

        def draw(n: int) -> Any:
            lr, hr = sampler.draw(n, rng, with_hr=with_hr)
            lr = lr.to(self.device)
            return (lr, hr.to(self.device) if hr is not None else None) if with_hr else lr

        return draw

    def fitting_size(self, wanted: int, share: float = 0.5) -> int:
        """`wanted` if at least `share` of the images hold an LR crop of it, else the largest multiple of 8 below it
        that they do (else the largest LR side any image has): large preset crops on small training images."""
        sides = [min(image_size(path)) // self.scale for path in list_images(self.folder)]
        if not sides:
            raise SrquantError(f"calibration folder {self.folder} has no images")
        for size in [wanted, *range((wanted - 1) // 8 * 8, 0, -8)]:
            if sum(side >= size for side in sides) >= share * len(sides):
                return size
        return max(1, max(sides))


@dataclass
class MethodRun:
    """What a method's run produced: the model to evaluate, the spec it used, its state for the checkpoint."""

    model: nn.Module  # what to evaluate: the network itself, or a wrapper for dynamic bits
    report: QuantReport
    spec: QuantSpec
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] | None = None
    rollbacks: list[str] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


class Method:
    """Base class of a quantization method (see the module docstring)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    config_type: ClassVar[type] = type(None)
    presets: ClassVar[Mapping[str, Any]] = {}
    dynamic: ClassVar[bool] = False  # bits change per image or patch: no single integer graph

    def config(self, preset: str, overrides: Mapping[str, Any] | None = None) -> Any:
        """The preset's config with some fields replaced (None values are ignored, unknown fields refused)."""
        if preset not in self.presets:
            raise SrquantError(f"{self.name} has no preset {preset!r}; choose from {', '.join(self.presets)}")
        given = {k: v for k, v in (overrides or {}).items() if v is not None}
        known = {f.name for f in dataclasses.fields(self.config_type)}
        unknown = sorted(set(given) - known)
        if unknown:
            raise SrquantError(f"{unknown[0]} does not apply to {self.name} (its settings: {', '.join(sorted(known))})")
        try:
            return dataclasses.replace(self.presets[preset], **given)
        except (TypeError, ValueError) as err:
            raise SrquantError(f"{self.name}: {err}") from None

    def fixed_twin(self, a_bits: int) -> dict[str, Any]:
        """Config overrides that make a dynamic method fixed-bit at `a_bits` with everything else unchanged."""
        raise SrquantError(f"--no-adapt applies to dynamic methods; {self.name} already runs fixed bits")

    def default_granularity(self, preset: str) -> str:
        """The weight granularity when none is asked for: the papers' per-tensor for their presets."""
        return "tensor" if preset in PAPER_PRESETS else DEFAULT_GRANULARITY

    def run(
        self,
        model: nn.Module,
        layout: QuantLayout,
        spec: QuantSpec,
        data: CalibrationData,
        config: Any,
        progress: bool = False,
    ) -> MethodRun:
        """Quantize `model` in place and calibrate or train it."""
        raise NotImplementedError

    def settings(self, config: Any) -> dict[str, Any]:
        """The config as checkpoint metadata."""
        return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else {}

    def rebuild(self, network: nn.Module, layout: QuantLayout, spec: QuantSpec, state: dict[str, Any] | None) -> None:
        """Loading: give a float network the quantizers the saved one had (before its state is loaded)."""
        quantize_(network, spec, layout)

    def inference_model(self, network: nn.Module, state: dict[str, Any] | None) -> nn.Module:
        """Loading: the module that computes what this method's model computes (after the state is loaded)."""
        return network
