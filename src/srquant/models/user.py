"""The user's own networks: any nn.Module (RGB in, RGB out, s times larger), from a Python file or an object.

`network_from_file("net.py:MyNet", kwargs, scale, weights, input_range)` imports the file, builds the class and
loads the weights strictly; `adopt(module, scale, kwargs, input_range)` prepares a module given through the API.
Either way the network carries an architecture record (file, class, kwargs, input range, scale, and the file's
sha256), so a quantized checkpoint can rebuild it (`rebuild`); a missing or changed file is a one-line error.
Networks trained on [0, 255] inputs (`input_range=255`) get their input scaled up and their output down by hooks,
so their module names stay theirs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from srquant.errors import SrquantError

ARCH_ATTRIBUTE = "srquant_arch"
INPUT_RANGES = (1.0, 255.0)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def import_class(file: str | Path, class_name: str) -> type[nn.Module]:
    """The class `class_name` defined in a Python file (imported under a name derived from its path)."""
    path = Path(file).expanduser()
    if not path.is_file():
        raise SrquantError(f"architecture file not found: {path}")
    module_name = f"srquant_user_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise SrquantError(f"{path} is not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 - the user's file: one line, whatever it raised
        sys.modules.pop(module_name, None)
        raise SrquantError(f"importing {path} failed: {type(err).__name__}: {err}") from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise SrquantError(f"{path} defines no nn.Module class named {class_name!r}")
    return cls


def parse_arch(text: str) -> tuple[Path, str]:
    """`FILE.py:ClassName` -> (file, class name)."""
    file, sep, class_name = text.rpartition(":")
    if not sep or not file or not class_name:
        raise SrquantError(f"--arch takes FILE.py:ClassName, got {text!r}")
    return Path(file), class_name


def _scale_input(_module: nn.Module, args: tuple) -> tuple:
    return (args[0] * 255.0, *args[1:])


def _scale_output(_module: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
    return out / 255.0


@torch.no_grad()
def _check_scale(model: nn.Module, scale: int, label: str) -> None:
    """Refuse a network that does not upscale by `scale` (one probe forward on a small input)."""
    multiple = int(getattr(model, "pad_multiple", 1))
    side = -(-16 // multiple) * multiple
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        out = model(torch.rand(1, 3, side, side, device=device))
    except Exception as err:  # noqa: BLE001 - the user's forward: one line
        raise SrquantError(f"{label} failed on a 1x3x{side}x{side} input: {type(err).__name__}: {err}") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 4 or out.shape[1] != 3:
        raise SrquantError(f"{label} must map 1x3xHxW RGB to 1x3x(sH)x(sW) RGB, got {getattr(out, 'shape', type(out))}")
    if tuple(out.shape[-2:]) != (side * scale, side * scale):
        found = out.shape[-1] / side
        raise SrquantError(f"{label} upscales x{found:g}, but --scale {scale} was given")


def adopt(
    model: nn.Module,
    scale: int,
    kwargs: Mapping[str, Any] | None = None,
    input_range: float = 1.0,
    record: dict[str, Any] | None = None,
) -> nn.Module:
    """Prepare a user module for srquant: its scale, the input-range hooks, a checked scale, and the record of how
    to rebuild it (its class's source file, unless `record` is given)."""
    if float(input_range) not in INPUT_RANGES:
        raise SrquantError(f"--input-range is 1 ([0, 1] inputs) or 255 ([0, 255] inputs), got {input_range}")
    label = type(model).__name__
    if record is None:
        try:
            source = Path(inspect.getfile(type(model))).resolve()
        except (TypeError, OSError):
            raise SrquantError(f"{label}'s source file cannot be found: define it in a .py file") from None
        record = {"kind": "file", "file": str(source), "class": type(model).__qualname__, "sha256": _digest(source)}
    record = {**record, "kwargs": dict(kwargs or {}), "input_range": float(input_range), "scale": int(scale)}
    model.scale = int(scale)
    handles = []
    if float(input_range) == 255.0:
        handles = [model.register_forward_pre_hook(_scale_input), model.register_forward_hook(_scale_output)]
    try:
        _check_scale(model.eval(), int(scale), label)
    except SrquantError:
        for handle in handles:  # the module is left as it was given
            handle.remove()
        raise
    setattr(model, ARCH_ATTRIBUTE, record)
    return model


def network_from_file(
    arch: str,
    scale: int,
    kwargs: Mapping[str, Any] | None = None,
    input_range: float = 1.0,
) -> nn.Module:
    """Build `FILE.py:ClassName(**kwargs)` (random weights) for srquant, recording how to rebuild it."""
    file, class_name = parse_arch(arch)
    cls = import_class(file, class_name)
    try:
        model = cls(**dict(kwargs or {}))
    except Exception as err:  # noqa: BLE001 - the user's constructor: one line
        raise SrquantError(f"{class_name}(**{dict(kwargs or {})}) failed: {type(err).__name__}: {err}") from None
    source = file.expanduser().resolve()
    record = {"kind": "file", "file": str(source), "class": class_name, "sha256": _digest(source)}
    return adopt(model, scale, kwargs, input_range, record)


def rebuild(record: Mapping[str, Any]) -> nn.Module:
    """A user network from its architecture record; a missing or changed file is a one-line error."""
    source = Path(record["file"])
    if not source.is_file():
        raise SrquantError(f"the architecture file {source} of this checkpoint is missing; put it back to load it")
    if _digest(source) != record["sha256"]:
        raise SrquantError(
            f"the architecture file {source} changed since the checkpoint was written (sha256 "
            f"{_digest(source)[:12]}... instead of {str(record['sha256'])[:12]}...); restore it or quantize again"
        )
    cls = import_class(source, str(record["class"]).split(".")[-1])
    try:
        model = cls(**dict(record.get("kwargs", {})))
    except Exception as err:  # noqa: BLE001 - the user's constructor: one line
        raise SrquantError(
            f"cannot rebuild {record['class']}(**{dict(record.get('kwargs', {}))}): {type(err).__name__}: {err}; "
            "give its constructor arguments when quantizing (--arch-kwargs / arch_kwargs=)"
        ) from None
    return adopt(model, int(record["scale"]), record.get("kwargs"), float(record.get("input_range", 1.0)), dict(record))
