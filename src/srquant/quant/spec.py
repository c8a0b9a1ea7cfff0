"""What to quantize and how: a validated dataclass spec (layer defaults come from the zoo's `QuantLayout`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from srquant.models.layout import QuantLayout

WEIGHT_QUANTIZERS = ("asymmetric", "symmetric", "lsq")
ACT_QUANTIZERS = ("asymmetric", "lsq")
GRANULARITIES = ("tensor", "channel")
ACT_GRANULARITIES = ("tensor", "part")


@dataclass(frozen=True)
class QuantSpec:
    """A quantization recipe: bit-widths, layer selection and quantizer kinds.

    Layer selection: a module is quantized at (w_bits, a_bits) if its name matches `layers` (default: the
    architecture layout's body) and not `keep_fp`; it is quantized at A8 if it matches `fixed_8bit` (default:
    the layout's, when `full` is set), with weights at `full_w_bits` (8; 7 keeps int8 codes within +-63, which
    onnxruntime's int8 kernels add without saturating on CPUs without VNNI). Attention matmul operands are
    quantized at a_bits when `matmul` is set and the architecture exposes the hooks.

    With `output_bits`, every quantized layer also quantizes its output (bias included) at that width, as
    integer kernels such as onnxruntime's QLinearConv do, and every activation grid gets an integer zero point
    (uint8 kernels need one); the simulated model then computes what the exported integer graph computes. With
    `glue_bits` (which needs `output_bits`), the tensors between layers that the architecture marks with `*_glue`
    hooks (activation outputs, concatenations, residual sums, attention gates) are quantized too, so an integer
    runtime can chain its kernels without returning to float between them.

    `weight_granularity`: `channel` gives every output channel of a weight its own grid (per-channel int8, the
    default of onnxruntime, TensorRT and PyTorch PT2E); `tensor` gives the weight one grid, or one per slice of a
    fused weight the layout lists in `weight_groups` (2DQuant's separate q, k, v bounds), as the papers do.

    `act_granularity`: `tensor` gives every layer input one grid, as the papers do; `part` gives the input of each
    conv the layout lists in `input_parts` (a concatenation of equal channel parts from different sources) one
    grid per part (per channel where the layout lists `PER_CHANNEL`), so a part with a narrow range is not rounded
    on a grid sized for a wide one. The integer export takes per-tensor input grids only.
    """

    w_bits: int = 4
    a_bits: int = 4
    layers: tuple[str, ...] | None = None
    keep_fp: tuple[str, ...] = ()
    full: bool = False
    fixed_8bit: tuple[str, ...] | None = None
    full_w_bits: int = 8
    matmul: bool = True
    weight_quantizer: str = "asymmetric"
    act_quantizer: str = "asymmetric"
    weight_granularity: str = "channel"
    act_granularity: str = "tensor"
    output_bits: int | None = None
    glue_bits: int | None = None
    extra: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, bits in (("w_bits", self.w_bits), ("a_bits", self.a_bits), ("full_w_bits", self.full_w_bits)):
            if not isinstance(bits, int) or not 1 <= bits <= 16:
                raise ValueError(f"{name} must be an integer in [1, 16], got {bits!r}")
        if self.output_bits is not None and (not isinstance(self.output_bits, int) or not 2 <= self.output_bits <= 16):
            raise ValueError(f"output_bits must be None or an integer in [2, 16], got {self.output_bits!r}")
        if self.glue_bits is not None:
            if not isinstance(self.glue_bits, int) or not 2 <= self.glue_bits <= 16:
                raise ValueError(f"glue_bits must be None or an integer in [2, 16], got {self.glue_bits!r}")
            if self.output_bits is None:
                raise ValueError("glue_bits needs output_bits: quantized glue only helps between quantized outputs")
        if self.weight_quantizer == "symmetric" and min(self.w_bits, self.full_w_bits) < 2:
            raise ValueError("a symmetric weight grid needs at least 2 bits (1 bit has no step on either side of 0)")
        if self.weight_quantizer not in WEIGHT_QUANTIZERS:
            raise ValueError(f"weight_quantizer must be one of {WEIGHT_QUANTIZERS}, got {self.weight_quantizer!r}")
        if self.weight_granularity not in GRANULARITIES:
            raise ValueError(f"weight_granularity must be one of {GRANULARITIES}, got {self.weight_granularity!r}")
        if self.act_granularity not in ACT_GRANULARITIES:
            raise ValueError(f"act_granularity must be one of {ACT_GRANULARITIES}, got {self.act_granularity!r}")
        if self.act_granularity == "part" and self.act_quantizer != "asymmetric":
            raise ValueError("act_granularity 'part' needs the asymmetric activation quantizer")
        if self.act_quantizer not in ACT_QUANTIZERS:
            raise ValueError(f"act_quantizer must be one of {ACT_QUANTIZERS}, got {self.act_quantizer!r}")
        for pattern in (*(self.layers or ()), *self.keep_fp, *(self.fixed_8bit or ())):
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"bad layer pattern {pattern!r}: {err}") from None

    def to_dict(self) -> dict[str, object]:
        """A JSON/checkpoint-friendly form (tuples become lists)."""
        return {
            "w_bits": self.w_bits,
            "a_bits": self.a_bits,
            "layers": list(self.layers) if self.layers is not None else None,
            "keep_fp": list(self.keep_fp),
            "full": self.full,
            "fixed_8bit": list(self.fixed_8bit) if self.fixed_8bit is not None else None,
            "full_w_bits": self.full_w_bits,
            "matmul": self.matmul,
            "weight_quantizer": self.weight_quantizer,
            "act_quantizer": self.act_quantizer,
            "weight_granularity": self.weight_granularity,
            "act_granularity": self.act_granularity,
            "output_bits": self.output_bits,
            "glue_bits": self.glue_bits,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> QuantSpec:
        """Inverse of `to_dict`."""
        values = dict(data)
        for key in ("layers", "fixed_8bit"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])  # type: ignore[arg-type]
        values["keep_fp"] = tuple(values.get("keep_fp", ()))  # type: ignore[arg-type]
        return cls(**values)  # type: ignore[arg-type]


def matches(name: str, patterns: tuple[str, ...]) -> bool:
    """True if the module name fully matches any of the regular expressions."""
    return any(re.fullmatch(p, name) for p in patterns)


__all__ = ["QuantLayout", "QuantSpec", "matches"]
