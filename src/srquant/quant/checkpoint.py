"""The quantized network's part of a checkpoint: quantizer modes, float state, and every quantized weight packed
as b-bit integer codes from its own quantizer's grid.

`network_state(model)` gives that part; `restore_network(model, saved)` puts it back into a network that the same
`quantize_` call (and the same method's rebuild step) produced: it loads the float state strictly, restores the
modes, and sets each weight to the values of its codes, which the weight quantizer maps to themselves, so the
reloaded network computes what the saved one computed, bit for bit. A 4-bit weight takes 1/8 of its float size.
Codes are read and written on the CPU; everything else stays on the network's device.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from srquant.errors import SrquantError
from srquant.models.registry import load_state_strict, load_torch_file
from srquant.quant.modules import is_quantized
from srquant.quant.quantize import quantizers
from srquant.quant.quantizers import QuantMode

FORMAT = "srquant-quantized/2"
OLD_FORMATS = ("srquant-quantized/1",)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integer codes (< 2^bits) into a uint8 bit stream, most significant bit first."""
    flat = codes.detach().reshape(-1).to(torch.int64).cpu().numpy()
    if flat.size and (flat.min() < 0 or flat.max() >= 2**bits):
        raise ValueError(f"codes out of range for {bits} bits")
    shifts = np.arange(bits - 1, -1, -1, dtype=np.int64)
    bit_matrix = ((flat[:, None] >> shifts[None, :]) & 1).astype(np.uint8)
    return torch.from_numpy(np.packbits(bit_matrix.reshape(-1)))


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of `pack_codes`: the first `count` codes as int64 (on the CPU)."""
    stream = np.unpackbits(packed.cpu().numpy())[: count * bits].reshape(count, bits).astype(np.int64)
    weights = 1 << np.arange(bits - 1, -1, -1, dtype=np.int64)
    return torch.from_numpy(stream @ weights)


def _packed_weights(model: nn.Module) -> dict[str, tuple[nn.Module, Any]]:
    """Quantized layers whose weight quantizer is on: `<layer>.weight` -> (layer, its weight quantizer)."""
    return {
        f"{name}.weight": (module, module.weight_quantizer)
        for name, module in model.named_modules()
        if is_quantized(module) and module.weight_quantizer.mode is QuantMode.QUANT
    }


def network_state(model: nn.Module) -> dict[str, Any]:
    """The network's checkpoint part: modes, float state (one-element floats as plain floats), packed weights."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    packed: dict[str, dict[str, Any]] = {}
    for key, (module, quantizer) in _packed_weights(model).items():
        grid = quantizer.grid()
        codes = quantizer.to_codes(module.weight) - int(grid.qmin)
        bits = int(grid.bits)
        packed[key] = {
            "bits": bits,
            "offset": int(grid.qmin),
            "shape": list(module.weight.shape),
            "data": pack_codes(codes, bits),
        }
        del state[key]
    # One-element float tensors (quantizer bounds and steps) are stored as plain floats: torch.save spends
    # hundreds of bytes on each tensor, which for LMLT's 600 bounds outweighed the packed weights.
    scalars = {k: float(v) for k, v in state.items() if v.dim() == 0 and v.dtype == torch.float32}
    return {
        "modes": {name: q.mode.value for name, q in quantizers(model)},
        "state": {k: v for k, v in state.items() if k not in scalars},
        "scalars": scalars,
        "packed": packed,
    }


def restore_network(model: nn.Module, saved: Mapping[str, Any], origin: str) -> None:
    """Load `network_state` into a network quantized the same way (strictly; bit-identical weights)."""
    own = dict(quantizers(model))
    if set(own) != set(saved["modes"]):
        extra = sorted(set(saved["modes"]) - set(own))
        lacking = sorted(set(own) - set(saved["modes"]))
        first = f"it has {extra[0]}" if extra else f"it lacks {lacking[0]}"
        raise SrquantError(f"{origin}: its quantizers do not match the rebuilt network ({first})")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    placeholders = {key: torch.zeros(item["shape"]) for key, item in saved["packed"].items()}
    scalars = {k: torch.tensor(v, dtype=torch.float32) for k, v in saved["scalars"].items()}
    state = {k: v.to(device) for k, v in {**saved["state"], **scalars, **placeholders}.items()}
    load_state_strict(model, state, origin)
    for name, mode in saved["modes"].items():
        own[name].mode = QuantMode(mode)
    layers = _packed_weights(model)
    if set(layers) != set(saved["packed"]):
        raise SrquantError(f"{origin}: its packed weights do not match the quantized layers that are switched on")
    for key, item in saved["packed"].items():
        module, quantizer = layers[key]
        codes = unpack_codes(item["data"], int(item["bits"]), math.prod(item["shape"])) + int(item["offset"])
        with torch.no_grad():
            module.weight.copy_(quantizer.from_codes(codes.to(device), module.weight.shape))


def read_record(path: str | Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Read a quantized checkpoint (weights_only) onto a device; one line for a missing, foreign or old file."""
    path = Path(path)
    record = load_torch_file(path, device)
    if not isinstance(record, dict) or not str(record.get("format", "")).startswith("srquant-quantized"):
        raise SrquantError(
            f"{path} is a float checkpoint, not an srquant quantized one; evaluate it with --model NAME --weights"
        )
    if record["format"] in OLD_FORMATS:
        meta = record.get("meta", {}) if isinstance(record.get("meta"), dict) else {}
        spec = record.get("spec", {}) if isinstance(record.get("spec"), dict) else {}
        redo = (
            f"srquant quantize --model {record.get('model', 'NAME')} --scale {record.get('scale', 'S')} "
            f"--method {meta.get('method', 'METHOD')} "
            f"--wbits {spec.get('w_bits', 'B')} --abits {spec.get('a_bits', 'B')}"
        )
        raise SrquantError(
            f"{path} was written by an earlier srquant ({record['format']}); redo it with: {redo} -o FILE"
        )
    if record["format"] != FORMAT:
        raise SrquantError(f"{path} has checkpoint format {record['format']!r}; this srquant reads {FORMAT!r}")
    return record
