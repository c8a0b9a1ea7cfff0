"""Quantized checkpoints: the recipe, the bounds, and every quantized weight packed as b-bit integer codes.

A file holds `format`, the zoo `model` name and `scale`, the `spec`, each quantizer's mode, the float
state of everything not packed (one-element bounds as plain floats), and for each quantized weight its
codes packed into bytes (a 4-bit weight takes 1/8 of its float size). Loading rebuilds the architecture,
applies the same `quantize_`, restores bounds and modes, and sets each weight to its dequantized codes,
which the weight quantizer maps to itself:
the reloaded model's outputs equal the saved model's bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from srquant.errors import SrquantError
from srquant.models.registry import build_model, get_entry, load_state_strict
from srquant.quant.modules import is_quantized
from srquant.quant.quantize import quantize_, quantizers
from srquant.quant.quantizers import AsymmetricQuantizer, LSQQuantizer, Quantizer, QuantMode, SymmetricQuantizer
from srquant.quant.spec import QuantSpec

FORMAT = "srquant-quantized/1"


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integer codes (< 2^bits) into a uint8 bit stream, most significant bit first."""
    flat = codes.reshape(-1).to(torch.int64).numpy()
    if flat.size and (flat.min() < 0 or flat.max() >= 2**bits):
        raise ValueError(f"codes out of range for {bits} bits")
    shifts = np.arange(bits - 1, -1, -1, dtype=np.int64)
    bit_matrix = ((flat[:, None] >> shifts[None, :]) & 1).astype(np.uint8)
    return torch.from_numpy(np.packbits(bit_matrix.reshape(-1)))


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of `pack_codes`: the first `count` codes as int64."""
    stream = np.unpackbits(packed.numpy())[: count * bits].reshape(count, bits).astype(np.int64)
    weights = 1 << np.arange(bits - 1, -1, -1, dtype=np.int64)
    return torch.from_numpy(stream @ weights)


def _codes_and_dequant(q: Quantizer, weight: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """Integer codes of a weight under its quantizer, and a function mapping codes back to values."""
    bits = q.bits
    w = weight.detach()
    if isinstance(q, AsymmetricQuantizer):
        lower, upper = (t.detach() for t in q._bounds())
        rows = q.grouped(w)
        step = (upper - lower).clamp_min(1e-8) / (2**bits - 1)
        codes = torch.round((torch.minimum(torch.maximum(rows, lower), upper) - lower) / step)

        def back(c: torch.Tensor) -> torch.Tensor:
            return (c.reshape(rows.shape).to(w.dtype) * step + lower).reshape(w.shape)

        return codes.reshape(-1), back
    if isinstance(q, SymmetricQuantizer):
        half = 2 ** (bits - 1) - 1
        upper = q.upper_bound.detach().abs().clamp_min(1e-8)
        step = upper / half
        codes = torch.round(torch.clamp(w, -upper, upper) / step) + half

        def back(c: torch.Tensor) -> torch.Tensor:
            return ((c.reshape(w.shape).to(w.dtype) - half) * step).reshape(w.shape)

        return codes.reshape(-1), back
    if isinstance(q, LSQQuantizer):
        qn, qp = q.qrange()
        step = q.step.detach()
        codes = torch.clamp(torch.round(torch.clamp(w / step, qn, qp)), qn, qp) - qn

        def back(c: torch.Tensor) -> torch.Tensor:
            return (c.reshape(w.shape).to(w.dtype) + qn) * step

        return codes.reshape(-1), back
    raise SrquantError(f"cannot pack weights of {type(q).__name__}")


def save_quantized(
    model: nn.Module,
    path: str | Path,
    name: str,
    spec: QuantSpec,
    meta: dict[str, Any],
    dynamic: dict[str, Any] | None = None,
) -> int:
    """Write a quantized checkpoint; returns the file size in bytes.

    `dynamic` holds a dynamic method's own state (e.g. AdaBM's bit controller), restored by
    `srquant.methods.dynamic.restore_dynamic`.
    """
    entry = get_entry(name)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    packed: dict[str, dict[str, Any]] = {}
    for module_name, module in model.named_modules():
        if not is_quantized(module) or module.weight_quantizer.mode is not QuantMode.QUANT:
            continue
        q = module.weight_quantizer
        codes, _ = _codes_and_dequant(q, module.weight)
        key = f"{module_name}.weight"
        packed[key] = {"bits": q.bits, "shape": list(module.weight.shape), "data": pack_codes(codes, q.bits)}
        del state[key]
    # One-element float tensors (quantizer bounds and steps) are stored as plain floats: torch.save spends
    # hundreds of bytes on each tensor, which for LMLT's 600 bounds outweighed the packed weights.
    scalars = {k: float(v) for k, v in state.items() if v.dim() == 0 and v.dtype == torch.float32}
    state = {k: v for k, v in state.items() if k not in scalars}
    record = {
        "format": FORMAT,
        "model": entry.name,
        "scale": int(model.scale),
        "spec": spec.to_dict(),
        "modes": {qname: q.mode.value for qname, q in quantizers(model)},
        "state": state,
        "scalars": scalars,
        "packed": packed,
        "meta": meta,
        "dynamic": dynamic,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(record, tmp)
    tmp.replace(path)
    return path.stat().st_size


def is_quantized_checkpoint(path: str | Path) -> bool:
    """True if the file is an srquant quantized checkpoint (read with weights_only=True)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any unreadable file is simply "not one of ours"
        return False
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def load_quantized(
    path: str | Path, prepare: Callable[[nn.Module, dict[str, Any]], None] | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a quantized model from its checkpoint; returns (model in eval mode, the checkpoint record).

    `prepare(model, record)` runs right after `quantize_` and before any state is loaded: a method whose
    quantizers differ from `quantize_`'s (Granular-DQ's multi-bit inputs) rebuilds them there, e.g. with
    `srquant.methods.dynamic.prepare_dynamic`.
    """
    path = Path(path)
    if not path.is_file():
        raise SrquantError(f"quantized checkpoint not found: {path}")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - reported as one line below
        raise SrquantError(f"{path} is not a loadable checkpoint: {str(err).splitlines()[0][:200]}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise SrquantError(
            f"{path} is a float checkpoint, not an srquant quantized one; evaluate it with --model NAME --weights"
        )
    entry = get_entry(record["model"])
    spec = QuantSpec.from_dict(record["spec"])
    model = build_model(entry.name, int(record["scale"]))
    quantize_(model, spec, entry.layout)
    if prepare is not None:
        prepare(model, record)
    own_quantizers = dict(quantizers(model))
    if set(own_quantizers) != set(record["modes"]):
        hint = ""
        if record.get("dynamic") and prepare is None:
            hint = " (it holds a dynamic method's state: load it with prepare=srquant.methods.dynamic.prepare_dynamic)"
        raise SrquantError(f"{path}: its quantizers do not match {entry.name} quantized with its spec{hint}")
    placeholders = {key: torch.zeros(item["shape"]) for key, item in record["packed"].items()}
    scalars = {k: torch.tensor(v, dtype=torch.float32) for k, v in record.get("scalars", {}).items()}
    load_state_strict(model, {**record["state"], **scalars, **placeholders}, str(path))
    for qname, mode in record["modes"].items():
        own_quantizers[qname].mode = QuantMode(mode)
    modules = dict(model.named_modules())
    for key, item in record["packed"].items():
        module = modules[key.rpartition(".")[0]]
        count = math.prod(item["shape"])
        codes = unpack_codes(item["data"], int(item["bits"]), count)
        _, back = _codes_and_dequant(module.weight_quantizer, module.weight)
        with torch.no_grad():
            module.weight.copy_(back(codes))
    return model.eval(), record
