"""Operation and storage accounting for any SR ``nn.Module``, independent of how it is quantized.

Conventions (one place, so that every table can name them):

* **Ops are MACs** (multiply-accumulates). ``OpsRow.macs`` and every ``*_macs`` value count one
  multiply-add as one op; FLOPs are ``2 * MACs`` (``OpsRow.flops``, ``OpsReport.total_flops`` and
  ``unit="flops"`` in :func:`ops_at_bits` / :func:`bitops`). SwinIR's ``flops()`` methods, 2DQuant's
  "Ops (G)"/"FLOPs" and the usual "Mult-Adds" of SR papers are all MAC counts.
* :func:`count_ops` runs one forward pass (batch 1) and attributes every ATen op to the innermost module
  running at the time:

  - ``conv``: a convolution an ``nn.Conv2d`` (or any ``_ConvNd``, subclasses included) runs with a kernel
    of its own weight's shape: ``out.numel() * C_in/groups * kh * kw`` MACs. Row name: the module name;
    ``params``: weight + bias.
  - ``linear``: a matrix product inside an ``nn.Linear``: ``M * N * K`` MACs. Bias additions of Linear and
    conv layers are not counted, whether fused (``addmm``) or not (a separate ``add`` on strided input).
  - ``matmul``: any other matrix product (``mm``/``bmm``/SDPA...), i.e. attention's ``q @ k^T`` and
    ``attn @ v`` (ESWT's ``q @ q^T`` too). Row ``"<module>.matmul"``, where ``<module>`` is the nearest
    enclosing module owning the contract's ``q_hook``/``k_hook``/``v_hook``/``attn_hook`` (else the
    innermost module); ``params`` 0.
  - ``other``: everything else, at **one op per element of the largest tensor the op reads or writes**
    (adds, norms, softmax, activations, pooling, interpolation of any mode, masks). Ops that only create,
    view or move data (reshape, permute, copy, cat, roll, flip, pad, index, pixel shuffle) count 0. A
    convolution with a foreign kernel (ESWT's fixed one-pixel shift inside ``ShiftConv2d1x1``, frozen
    mean-shift 1x1 convs) counts as ``other`` with one kernel tap per output (``MACs / (kh * kw)``): exact
    for a 1x1 kernel, and one op per element for a shift. ``params``: the module's remaining direct
    parameters (norm affine, ``relative_position_bias_table``, ESWT's frozen shift kernels).

  The root module's own ops form the row named ``""``. Padding the model does inside ``forward`` (window
  multiples) is part of what is counted: SwinIR, for instance, always pads 1..8 pixels.
* Storage: :func:`param_bytes` counts ``nn.Parameter`` tensors only (frozen ones included unless
  ``learned_only``), never buffers (``relative_position_index``, attention masks, RGB means). SwinIR's
  ``relative_position_bias_table`` is a learned parameter and is counted, at 32 bit, unless excluded
  (``exclude=SWINIR_PAPER_EXCLUDES`` matches the published SwinIR / 2DQuant counts, which leave it out).
* Units are explicit: :data:`MB` = 10**6 bytes and :data:`MIB` = 2**20 bytes; ops in :data:`GIGA` = 10**9.
* Paper figures: SwinIR's "Mult-Adds" and 2DQuant's "Ops" come from SwinIR's hand-written ``flops()``
  formulas (MACs, exact for Linear and attention matmuls, short on two convs, norms only as "other") on a
  fixed token grid; ``tests/test_complexity.py`` rebuilds them from these rows and states each difference.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from srquant.errors import SrquantError

CONV = "conv"
LINEAR = "linear"
MATMUL = "matmul"
OTHER = "other"
KINDS: tuple[str, ...] = (CONV, LINEAR, MATMUL, OTHER)
"""Row kinds, in report order."""
QUANTIZABLE_KINDS: tuple[str, ...] = (CONV, LINEAR, MATMUL)
"""Kinds a bit-width may be given for; ``other`` rows always count at full precision."""

MB = 10**6
"""Decimal megabyte, in bytes."""
MIB = 2**20
"""Binary mebibyte, in bytes."""
GIGA = 10**9
"""Decimal giga, for ops."""

SWINIR_PAPER_EXCLUDES: tuple[str, ...] = ("relative_position_bias_table",)
"""Parameter-name suffixes the SwinIR paper (878K/886K/897K) and 2DQuant's size script leave out."""

FULL_BITS = 32
"""Bit-width of an unquantized tensor."""

HOOK_NAMES = ("q_hook", "k_hook", "v_hook", "attn_hook")
"""Identity hooks that mark an attention module (architecture contract, rule 5)."""

Unit = Literal["macs", "flops"]

# ATen ops that only create, view or move data: zero arithmetic.
_DATA_MOVEMENT = frozenset(
    """
    view _unsafe_view reshape _reshape_alias permute transpose t expand expand_as slice select unsqueeze
    squeeze split split_with_sizes chunk unbind alias as_strided detach narrow unfold movedim swapaxes
    view_as diagonal lift_fresh lift_fresh_copy clone _to_copy copy copy_ contiguous cat stack roll flip
    constant_pad_nd reflection_pad1d reflection_pad2d reflection_pad3d replication_pad1d replication_pad2d
    replication_pad3d index index_select gather repeat empty empty_like empty_strided new_empty
    new_empty_strided zeros zeros_like new_zeros ones ones_like new_ones full full_like new_full fill fill_
    zero_ arange scalar_tensor _local_scalar_dense pixel_shuffle pixel_unshuffle native_channel_shuffle
    channel_shuffle embedding set_ resize_
    """.split()
)


@dataclass(frozen=True)
class OpsRow:
    """Ops of one module (or of one attention module's matmuls) for one forward pass, in MACs."""

    name: str
    kind: str
    macs: int
    params: int

    @property
    def flops(self) -> int:
        """The same count in FLOPs (2 per MAC)."""
        return 2 * self.macs


@dataclass(frozen=True)
class OpsReport:
    """Per-module MAC counts of one batch-1 forward pass on an ``lr_size`` input (see module docstring)."""

    lr_size: tuple[int, int]
    out_size: tuple[int, int]
    rows: tuple[OpsRow, ...]

    @property
    def total_macs(self) -> int:
        """All MACs of the pass."""
        return sum(row.macs for row in self.rows)

    @property
    def total_flops(self) -> int:
        """All ops of the pass in FLOPs (2 per MAC)."""
        return 2 * self.total_macs

    def macs_by_kind(self) -> dict[str, int]:
        """MACs summed per kind (every kind present, possibly 0), in :data:`KINDS` order."""
        sums = dict.fromkeys(KINDS, 0)
        for row in self.rows:
            sums[row.kind] += row.macs
        return sums

    def flops_by_kind(self) -> dict[str, int]:
        """FLOPs summed per kind (2 per MAC)."""
        return {kind: 2 * macs for kind, macs in self.macs_by_kind().items()}

    def names(self, *kinds: str) -> list[str]:
        """Row names of the given kinds (all quantizable kinds when none is given), in execution order."""
        wanted = kinds or QUANTIZABLE_KINDS
        return [row.name for row in self.rows if row.kind in wanted]

    def row(self, name: str, kind: str | None = None) -> OpsRow:
        """The row called ``name`` (of ``kind``, else its quantizable row first); unknown names raise."""
        matches = [row for row in self.rows if row.name == name and (kind is None or row.kind == kind)]
        if not matches:
            raise SrquantError(f"no ops row named {name!r}" + (f" of kind {kind!r}" if kind else ""))
        matches.sort(key=lambda row: row.kind not in QUANTIZABLE_KINDS)
        return matches[0]

    def table(self, unit: Unit = "macs") -> str:
        """A plain-text table of the rows and per-kind totals, in G (10**9) of ``unit``."""
        factor = _unit_factor(unit) / GIGA
        lines = [f"{'name':<60} {'kind':<7} {'G' + unit:>12} {'params':>9}"]
        lines += [
            f"{row.name or '<root>':<60} {row.kind:<7} {row.macs * factor:>12.6f} {row.params:>9}" for row in self.rows
        ]
        lines += [f"{'total ' + kind:<68} {macs * factor:>12.6f}" for kind, macs in self.macs_by_kind().items()]
        lines.append(f"{'total':<68} {self.total_macs * factor:>12.6f}")
        return "\n".join(lines)


def lr_size_for_output(scale: int, out_hw: tuple[int, int] = (720, 1280)) -> tuple[int, int]:
    """LR (height, width) whose x``scale`` output is ``out_hw``, each side rounded to nearest (ties up).

    This is the papers' "ops for a 1280x720 output" convention: 180x320 at x4 and 360x640 at x2 (exact);
    at x3 1280/3 = 426.7 rounds to 427, so the LR is 240x427 and the output 720x1281.
    """
    if scale < 1:
        raise SrquantError(f"scale must be a positive integer, got {scale}")
    height, width = out_hw
    return (2 * height + scale) // (2 * scale), (2 * width + scale) // (2 * scale)


def _unit_factor(unit: Unit) -> int:
    """Ops per MAC in ``unit``."""
    if unit == "macs":
        return 1
    if unit == "flops":
        return 2
    raise SrquantError(f"unit must be 'macs' or 'flops', got {unit!r}")


def _is_attention(module: nn.Module) -> bool:
    """Whether ``module`` owns the contract's four matmul-operand hooks."""
    return all(isinstance(getattr(module, hook, None), nn.Module) for hook in HOOK_NAMES)


class _OpsRecorder(TorchDispatchMode):
    """Dispatch mode that adds each ATen op's count to a (row name, kind) of the module running it."""

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        """``modules``: the model's named modules; the hooks in :func:`_record` keep ``stack`` current."""
        super().__init__()
        self.modules = modules
        self.stack: list[str] = []
        self.counts: dict[tuple[str, str], int] = {}
        self.out_size: tuple[int, int] = (0, 0)

    def enter(self, name: str) -> Any:
        """A forward pre-hook that marks module ``name`` as running (returns None: input unchanged)."""

        def hook(*_: Any) -> None:
            self.stack.append(name)

        return hook

    def leave(self, *_: Any) -> None:
        """Forward hook: the innermost module has finished (returns None: output unchanged)."""
        self.stack.pop()

    def _add(self, name: str, kind: str, macs: int) -> None:
        """Accumulate ``macs`` on the (name, kind) row, creating it on first use."""
        self.counts[(name, kind)] = self.counts.get((name, kind), 0) + int(macs)

    def _attention_owner(self) -> str:
        """Name of the nearest running module that owns attention hooks, else of the innermost module."""
        for name in reversed(self.stack):
            if _is_attention(self.modules[name]):
                return name
        return self.stack[-1] if self.stack else ""

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        """Run the op, then classify and count it."""
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = getattr(func, "overloadpacket", None)
        op_name = getattr(packet, "__name__", str(func))
        name = self.stack[-1] if self.stack else ""
        module = self.modules.get(name)
        if "scaled_dot_product" in op_name and packet not in flop_registry and len(args) >= 3:
            query, key, value = args[:3]  # [..., L, E], [..., S, E], [..., S, Ev]: both matmuls of SDPA
            batch = math.prod(query.shape[:-2])
            macs = batch * query.shape[-2] * key.shape[-2] * (query.shape[-1] + value.shape[-1])
            self._add(f"{self._attention_owner()}.matmul", MATMUL, macs)
        elif packet in flop_registry:
            macs = flop_registry[packet](*args, **kwargs, out_val=out) // 2
            if "conv" in op_name:
                weight = args[1]
                if isinstance(module, nn.modules.conv._ConvNd) and tuple(weight.shape) == tuple(module.weight.shape):
                    self._add(name, CONV, macs)
                else:  # a fixed auxiliary kernel: one tap per output
                    self._add(name, OTHER, macs // max(1, math.prod(weight.shape[2:])))
            elif isinstance(module, nn.Linear):
                self._add(name, LINEAR, macs)
            else:
                self._add(f"{self._attention_owner()}.matmul", MATMUL, macs)
        elif op_name in _DATA_MOVEMENT or isinstance(module, nn.Linear | nn.modules.conv._ConvNd):
            self._add(name, OTHER, 0)  # data movement, or a bias add a Linear/conv does unfused
        else:
            sizes = [leaf.numel() for leaf in tree_flatten((args, kwargs, out))[0] if isinstance(leaf, torch.Tensor)]
            self._add(name, OTHER, max(sizes, default=0))
        return out


def _meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers live on the meta device (no data is copied)."""
    memo: dict[int, Any] = {}
    for param in model.parameters():
        memo[id(param)] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
    for buffer in model.buffers():
        memo[id(buffer)] = torch.empty_like(buffer, device="meta")
    return copy.deepcopy(model, memo)


def _record(model: nn.Module, lr_size: tuple[int, int], device: torch.device, dtype: torch.dtype) -> _OpsRecorder:
    """Run one no-grad forward pass of ``model`` (already in eval mode) under the recorder."""
    modules = dict(model.named_modules())
    recorder = _OpsRecorder(modules)
    handles = []
    for name, module in modules.items():
        handles.append(module.register_forward_pre_hook(recorder.enter(name)))
        handles.append(module.register_forward_hook(recorder.leave))
    height, width = lr_size
    if device.type == "meta":
        x = torch.empty(1, 3, height, width, device=device, dtype=dtype)
    else:
        generator = torch.Generator().manual_seed(0)
        x = torch.rand(1, 3, height, width, generator=generator, dtype=dtype).to(device)
    try:
        with torch.no_grad(), recorder:
            out = model(x)
    finally:
        for handle in handles:
            handle.remove()
    recorder.out_size = (int(out.shape[-2]), int(out.shape[-1]))
    return recorder


def _rows(model: nn.Module, counts: Mapping[tuple[str, str], int]) -> tuple[OpsRow, ...]:
    """Attach parameter counts to the recorded (name, kind) counts, keeping execution order."""
    modules = dict(model.named_modules())
    named = {name for name, kind in counts if kind != OTHER}
    rows = []
    for (name, kind), macs in counts.items():
        if kind == OTHER and macs == 0 and name in named:
            continue  # only reshapes around a conv/linear/matmul: no separate row
        module = modules.get(name)
        params = 0
        if module is not None and kind in (CONV, LINEAR):
            params = sum(p.numel() for p in (module.weight, getattr(module, "bias", None)) if p is not None)
        elif module is not None and kind == OTHER:
            has_weight_row = (name, CONV) in counts or (name, LINEAR) in counts
            owned = {"weight", "bias"} if has_weight_row else set()
            params = sum(p.numel() for key, p in module.named_parameters(recurse=False) if key not in owned)
        rows.append(OpsRow(name, kind, int(macs), int(params)))
    return tuple(rows)


def count_ops(model: nn.Module, lr_size: tuple[int, int], meta: bool = True) -> OpsReport:
    """Count per-module MACs of one forward pass on a ``(1, 3, *lr_size)`` input (conventions: module doc).

    With ``meta`` (default) the pass runs on a meta-device copy of the model: shapes only, no arithmetic,
    no memory, same counts. If the copy cannot run (an op without a meta kernel, a tensor attribute outside
    the parameters and buffers), or with ``meta=False``, the real model runs once in eval mode under
    ``torch.no_grad`` on its own device and dtype (its training flag is restored afterwards).
    """
    height, width = lr_size
    if height < 1 or width < 1:
        raise SrquantError(f"lr_size must be positive, got {lr_size}")
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    recorder = None
    if meta:
        try:
            recorder = _record(_meta_copy(model).eval(), lr_size, torch.device("meta"), dtype)
        except (NotImplementedError, RuntimeError, TypeError):
            recorder = None
    if recorder is None:
        modes = {module: module.training for module in model.modules()}
        model.eval()
        try:
            recorder = _record(model, lr_size, device, dtype)
        finally:
            for module, training in modes.items():
                module.training = training
    return OpsReport((int(height), int(width)), recorder.out_size, _rows(model, recorder.counts))


def _check_bits(name: str, value: int) -> int:
    """Validate one bit-width (an integer in 1..32)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= FULL_BITS:
        raise SrquantError(f"bit-width for {name!r} must be an integer in 1..{FULL_BITS}, got {value!r}")
    return value


def _quantizable_rows(report: OpsReport, names: Iterable[str]) -> dict[str, OpsRow]:
    """The conv/linear/matmul rows of ``report`` by name; a name that is none of them raises."""
    rows = {row.name: row for row in report.rows if row.kind in QUANTIZABLE_KINDS}
    unknown = [name for name in names if name not in rows]
    if unknown:
        hint = ", ".join(list(rows)[:3])
        raise SrquantError(
            f"{len(unknown)} name(s) are not conv/linear/matmul rows of the ops report: "
            f"{', '.join(map(repr, unknown[:3]))}{' ...' if len(unknown) > 3 else ''} (rows look like: {hint})"
        )
    return rows


def ops_at_bits(report: OpsReport, quantized: Mapping[str, int], unit: Unit = "macs") -> float:
    """2DQuant's "Ops at N bits": sum of ``ops * N/32`` over quantized rows plus the ops of all other rows.

    ``quantized`` maps a conv/linear row name, or an attention's ``"<module>.matmul"`` row, to its bit-width
    N (weights and activations alike). Returns MACs, or FLOPs with ``unit="flops"``.
    """
    _quantizable_rows(report, quantized)
    total = 0.0
    for row in report.rows:
        bits = (
            _check_bits(row.name, quantized[row.name])
            if row.kind in QUANTIZABLE_KINDS and row.name in quantized
            else FULL_BITS
        )
        total += row.macs * bits / FULL_BITS
    return total * _unit_factor(unit)


def bitops(report: OpsReport, bits: Mapping[str, tuple[int, int]], unit: Unit = "macs") -> float:
    """CADyQ / Granular-DQ BitOPs: sum over rows of ``ops * (w_bits/32) * (a_bits/32)``; others at (32, 32).

    ``bits`` maps a conv/linear row to (weight bits, activation bits), or a matmul row to the bits of its
    (first, second) operand. Returns MACs-based BitOPs, or FLOPs-based with ``unit="flops"``.
    """
    _quantizable_rows(report, bits)
    total = 0.0
    for row in report.rows:
        w_bits, a_bits = FULL_BITS, FULL_BITS
        if row.kind in QUANTIZABLE_KINDS and row.name in bits:
            pair = tuple(bits[row.name])
            if len(pair) != 2:
                raise SrquantError(f"bits for {row.name!r} must be a (weight, activation) pair, got {pair!r}")
            w_bits, a_bits = _check_bits(row.name, pair[0]), _check_bits(row.name, pair[1])
        total += row.macs * (w_bits / FULL_BITS) * (a_bits / FULL_BITS)
    return total * _unit_factor(unit)


def _parameters(model: nn.Module, learned_only: bool, exclude: Iterable[str]) -> list[tuple[str, nn.Parameter]]:
    """The model's distinct named parameters, without frozen ones if ``learned_only`` and without names
    ending in any of ``exclude``."""
    suffixes = tuple(exclude)
    return [
        (name, p)
        for name, p in model.named_parameters()
        if (p.requires_grad or not learned_only) and not (suffixes and name.endswith(suffixes))
    ]


def param_count(model: nn.Module, learned_only: bool = False, exclude: Iterable[str] = ()) -> int:
    """Number of parameter elements; buffers never count (see :func:`param_bytes` for the options)."""
    return sum(p.numel() for _, p in _parameters(model, learned_only, exclude))


def param_bytes(
    model: nn.Module, weight_bits: Mapping[str, int], learned_only: bool = False, exclude: Iterable[str] = ()
) -> int:
    """Parameter storage in bytes with the named modules' ``weight`` at their bit-width, all else at 32 bit.

    Biases, norms, SwinIR's ``relative_position_bias_table`` (a learned parameter the network needs) and
    every other parameter count 4 bytes each; buffers (``relative_position_index``, attention masks) are
    never counted. Each quantized weight is packed and rounded up to whole bytes. ``learned_only`` leaves
    out frozen parameters (``requires_grad=False``: ESWT's shift kernels and mean shifts); ``exclude`` leaves
    out parameters whose dotted name ends with one of the given suffixes, e.g.
    :data:`SWINIR_PAPER_EXCLUDES` to match the published SwinIR parameter counts, which omit the bias tables.
    """
    modules = dict(model.named_modules())
    quantized: dict[int, int] = {}
    for name, bits in weight_bits.items():
        weight = getattr(modules.get(name), "weight", None)
        if not isinstance(weight, nn.Parameter):
            raise SrquantError(f"{name!r} is not a module of the model with a weight parameter")
        quantized[id(weight)] = _check_bits(name, bits)
    total = 0
    for _, param in _parameters(model, learned_only, exclude):
        total += -(-param.numel() * quantized.get(id(param), FULL_BITS) // 8)
    return total


def to_mb(nbytes: float) -> float:
    """Bytes in decimal megabytes (10**6 B)."""
    return nbytes / MB


def to_mib(nbytes: float) -> float:
    """Bytes in binary mebibytes (2**20 B)."""
    return nbytes / MIB


def to_giga(ops: float) -> float:
    """An op count in G (10**9)."""
    return ops / GIGA
