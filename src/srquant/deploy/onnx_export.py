"""ONNX export of a calibrated fixed-bit model as a QDQ graph that onnxruntime runs with integer kernels.

The float network is exported as it is, then every quantized Conv and Linear of the srquant model is
rewritten in the graph: its input goes through QuantizeLinear/DequantizeLinear with the scale and zero point
of the calibrated activation bounds (uint8), its weight becomes an int8 initializer with per-output-channel
scales behind a DequantizeLinear, its bias an int32 initializer (scale = input scale x weight scale), and its
output gets a Q/DQ pair. onnxruntime folds each `DQ -> Conv -> Q` group into QLinearConv and each
`DQ -> Gemm -> Q` group into QGemm (its QDQ rules require all three); Linear layers are traced as Gemm.

Glue quantizers (`QuantSpec.glue_bits`: tensors between layers) and the attention matmuls' operand quantizers
are traced as Q/DQ pairs, so onnxruntime also runs the activations, concatenations, sums, gates and matmuls
between the layers on integer kernels.

Exact rewrites follow. A DequantizeLinear is moved past the DepthToSpace, Split, nearest Resize and ReLU
ops that read it, so those run on uint8 (ReLU as Max with the zero point). Conversions between two uint8
grids and quantized concatenations run as uint8 lookup tables (and a plain Concat). A conv with fewer than
16 outputs gets zero channels up to 16 and a uint8 Slice after it (onnxruntime's int8 kernel is much slower
for 3 outputs); a narrow grouped conv runs as a dense conv with zero blocks, a wide one as one conv per group
(`layout_rewrites`, which also writes pixel shuffles channels-last). A conv module called several times (a
shared unit) is rewritten at every call (docs/deploy.md).

Output grids: a model quantized with `output_bits=8` simulates these output roundings, and its output
quantizers give the grids, so the integer graph computes what the fake-quant model computes (up to the
zero point, which ONNX rounds to an integer: a shift below half a step). Without them the export falls back
to the image grid (1/255) for the conv that makes the SR image, the readers' shared input grid, or the
min/max of the output over calibration inputs; those roundings are then not simulated and cost accuracy
(about 0.1 dB on IMDN x4 W8A8 against 0.005 dB with simulated outputs; see docs/deploy.md).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from srquant.deploy.layout_rewrites import (
    BRANCH_MIN_GROUP_OUTPUTS,
    nhwc_pixel_shuffle,
    remove_dead_nodes,
    sort_topologically,
    split_grouped_chains,
)
from srquant.deploy.uint8_rewrites import concat_in_uint8, requantize_in_uint8, sink_dequantize
from srquant.errors import SrquantError
from srquant.outputs import atomic_write
from srquant.quant.grid import symmetric_grid
from srquant.quant.modules import is_quantized
from srquant.quant.quantize import GLUE_HOOK_SUFFIX, MATMUL_HOOKS, fp_mode, quantizers
from srquant.quant.quantizers import Quantizer, QuantMode

OPSET = 17


@dataclass(frozen=True)
class ConvQuantParams:
    """Integer parameters of one quantized conv: uint8 input grid, int8 per-channel weight, int32 bias."""

    name: str
    input_scale: float
    input_zero_point: int
    weight_codes: np.ndarray  # int8, the weight's shape
    weight_scales: np.ndarray  # float32, one per output channel
    bias: np.ndarray | None  # float32; quantized to int32 at export
    weight_exact: bool  # the fake-quant weight equals codes * scales exactly
    output_grid: tuple[float, int] | None  # (scale, zero point) of the simulated output quantizer, if any
    peak_code: int = 0  # the largest |weight code|: above 64, u8 x s8 kernels without VNNI saturate
    input_exact: bool = True  # the input grid has an integer zero point (else it is rounded at export)


@dataclass
class ExportReport:
    """What the export did: quantized convs, which weights were re-gridded, how outputs were ranged."""

    convs: list[str] = field(default_factory=list)  # one entry per Conv node: a shared module once per call
    regridded_weights: list[str] = field(default_factory=list)
    calibrated_outputs: list[str] = field(default_factory=list)
    shared_outputs: list[str] = field(default_factory=list)
    image_outputs: list[str] = field(default_factory=list)
    simulated_outputs: list[str] = field(default_factory=list)
    sunk_dequantize: list[str] = field(default_factory=list)  # ops that now run on uint8 (DequantizeLinear after)
    glue: list[str] = field(default_factory=list)  # quantized tensors between layers, exported as Q/DQ pairs
    widened_convs: list[str] = field(default_factory=list)  # narrow convs run with zero channels added, then sliced
    branched_convs: list[str] = field(default_factory=list)  # wide grouped convs run as one conv per group
    nhwc_shuffles: list[str] = field(default_factory=list)  # pixel shuffles written channels-last
    uint8_requantize: list[str] = field(default_factory=list)  # grid-to-grid conversions as uint8 lookup tables
    uint8_concats: list[str] = field(default_factory=list)  # quantized concatenations as uint8 tables + Concat
    dynamic_axes: bool = True


SATURATION_FREE_CODE = 64  # |weight code| <= 64: u8 x s8 pairs stay inside int16 (2 * 255 * 64 < 32767)


def _input_grid(name: str, q: Quantizer) -> tuple[float, int, bool]:
    """uint8 scale and zero point of an 8-bit activation quantizer, read off its grid, and whether they are its
    grid exactly (a fractional zero point is rounded: the grid shifts by less than half a step)."""
    if q.bits_override is not None:
        raise SrquantError(f"{name}: dynamic per-image bits have no static integer graph; export a fixed-bit model")
    grid = q.grid()
    if grid.rows != 1:
        raise SrquantError(f"{name}: only per-tensor activation grids export to ONNX")
    if int(grid.qmax) - int(grid.qmin) != 255:
        raise SrquantError(f"{name}: activations at {q.bits} bits do not map onto uint8 kernels; export needs A8")
    zero = round(float(grid.zero_point)) - int(grid.qmin)
    return float(grid.scale), int(min(max(zero, 0), 255)), grid.integer_zero_point()


def _weight_grid(name: str, module: nn.Conv2d | nn.Linear) -> tuple[np.ndarray, np.ndarray, bool, int]:
    """int8 codes and per-output-channel scales of the fake-quantized weight; whether they are exact; the
    largest code magnitude.

    A grid with zero points at 0 and at most 8 bits maps exactly: the codes are its own integers, per tensor or
    per output channel. Other grids (asymmetric bounds whose grid misses zero) are re-gridded symmetrically per
    channel at 8 bits from their dequantized values, which is finer than their own grid but not identical.
    """
    q = module.weight_quantizer
    grid = q.grid()
    out = module.weight.shape[0]
    if int(grid.bits) > 8:
        raise SrquantError(f"{name}: {grid.bits}-bit weights do not fit int8")
    scale, zero = grid.per_channel(out)
    if bool((zero == 0).all()) and int(grid.qmin) >= -128 and int(grid.qmax) <= 127:
        codes = q.to_codes(module.weight)
        return codes.to(torch.int8).cpu().numpy(), scale.float().cpu().numpy(), True, int(codes.abs().max())
    with torch.no_grad():
        values = grid.fake(module.weight.detach()).double().cpu()
    regrid = symmetric_grid(values.reshape(out, -1).abs().amax(dim=1, keepdim=True), 8, rows=out)
    codes = regrid.to_codes(values)
    scales = regrid.scale.reshape(-1).float().numpy()
    return codes.to(torch.int8).numpy(), scales, False, int(codes.abs().max())


def conv_params(model: nn.Module) -> dict[str, ConvQuantParams]:
    """Integer parameters of every quantized conv or linear layer running in QUANT mode; refuses layers that
    cannot export."""
    params: dict[str, ConvQuantParams] = {}
    for name, module in model.named_modules():
        if not is_quantized(module):
            continue
        if not isinstance(module, nn.Conv2d | nn.Linear):
            kind = type(module).__name__
            raise SrquantError(f"{name}: only quantized Conv2d and Linear layers export to ONNX, not {kind}")
        if module.input_quantizer.mode is not QuantMode.QUANT or module.weight_quantizer.mode is not QuantMode.QUANT:
            continue
        scale, zero, input_exact = _input_grid(name, module.input_quantizer)
        codes, scales, exact, peak = _weight_grid(name, module)
        bias = module.bias.detach().cpu().numpy().astype(np.float32) if module.bias is not None else None
        out_q = module._modules.get("output_quantizer")
        simulated = out_q is not None and out_q.mode is QuantMode.QUANT
        output = _input_grid(f"{name}.output_quantizer", out_q)[:2] if simulated else None
        params[name] = ConvQuantParams(name, scale, zero, codes, scales, bias, exact, output, peak, input_exact)
    if not params:
        raise SrquantError("the model has no quantized conv or linear layer in QUANT mode: nothing to export")
    return params


def output_ranges(model: nn.Module, names: Sequence[str], inputs: Sequence[torch.Tensor]) -> dict[str, tuple]:
    """Min and max of each named conv's output over calibration inputs, in the fake-quant model."""
    ranges: dict[str, list[float]] = {}
    handles = []
    for name in names:

        def hook(_m: nn.Module, _a: tuple, out: torch.Tensor, name: str = name) -> None:
            low, high = float(out.min()), float(out.max())
            old = ranges.get(name, [low, high])
            ranges[name] = [min(old[0], low), max(old[1], high)]

        handles.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        with torch.no_grad():
            for x in inputs:
                model(x)
    finally:
        for handle in handles:
            handle.remove()
    return {name: (low, high) for name, (low, high) in ranges.items()}


class _GlueQDQ(nn.Module):
    """Stands in for a glue quantizer during export: traces to a QuantizeLinear -> DequantizeLinear pair."""

    def __init__(self, scale: float, zero: int) -> None:
        """Hold the uint8 grid of the quantizer it replaces."""
        super().__init__()
        self.scale, self.zero = scale, zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same rounding onnxruntime's QuantizeLinear / DequantizeLinear do."""
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero, 0, 255)


def glue_grids(model: nn.Module) -> dict[str, tuple[float, int]]:
    """uint8 grids of the quantizers on tensors between layers that run in QUANT mode: the glue taps and the
    attention matmuls' operands (query, key, value, softmax map)."""
    return {
        name: _input_grid(name, q)[:2]
        for name, q in quantizers(model, every_name=True)
        if (name.endswith(GLUE_HOOK_SUFFIX) or name.rpartition(".")[2] in MATMUL_HOOKS) and q.mode is QuantMode.QUANT
    }


class _glue_as_qdq:
    """Swap the glue quantizers for `_GlueQDQ` stand-ins while the float graph is traced, then put them back."""

    def __init__(self, model: nn.Module, grids: dict[str, tuple[float, int]]) -> None:
        """`grids` maps each glue quantizer's name to its (scale, zero point)."""
        self.model, self.grids = model, grids
        self.saved: tuple[tuple[str, nn.Module], ...] = ()

    def _swap(self, name: str, module: nn.Module) -> nn.Module:
        old = self.model.get_submodule(name)
        self.model.set_submodule(name, module)
        return old

    def __enter__(self) -> None:
        self.saved = tuple((name, self._swap(name, _GlueQDQ(*grid))) for name, grid in self.grids.items())

    def __exit__(self, *exc: object) -> None:
        for name, module in self.saved:
            self._swap(name, module)


class _linear_as_gemm:
    """While the float graph is traced, run the named Linear layers on 2-D views of their input, so each exports
    as one Gemm node that reads the layer's weight and bias by name (a 3-D input would give a MatMul on a
    folded, renamed transpose of the weight)."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        """`names`: the Linear modules to trace as Gemm."""
        self.modules = [model.get_submodule(name) for name in names]

    @staticmethod
    def _as_gemm(module: nn.Linear):  # noqa: ANN205 - a bound forward
        def forward(x: torch.Tensor) -> torch.Tensor:
            flat = torch.nn.functional.linear(x.reshape(-1, x.shape[-1]), module.weight, module.bias)
            return flat.reshape(*x.shape[:-1], flat.shape[-1])

        return forward

    def __enter__(self) -> None:
        for module in self.modules:
            module.forward = self._as_gemm(module)

    def __exit__(self, *exc: object) -> None:
        for module in self.modules:
            del module.forward  # the class's forward again


def _float_onnx(
    model: nn.Module,
    sample: torch.Tensor,
    dynamic: bool,
    glue: dict[str, tuple[float, int]] | None = None,
    linears: Sequence[str] = (),
) -> bytes:
    """The float network (quantizers off, glue quantizers as Q/DQ pairs, the named Linear layers as Gemm) as
    ONNX bytes, with the LR height/width dynamic when allowed."""
    buffer = io.BytesIO()
    axes = {"lr": {2: "height", 3: "width"}, "sr": {2: "out_height", 3: "out_width"}} if dynamic else None
    with fp_mode(model), _glue_as_qdq(model, glue or {}), _linear_as_gemm(model, linears), torch.no_grad(), _quiet():
        torch.onnx.export(
            model,
            (sample,),
            buffer,
            dynamo=False,
            opset_version=OPSET,
            input_names=["lr"],
            output_names=["sr"],
            dynamic_axes=axes,
            do_constant_folding=True,
            training=torch.onnx.TrainingMode.PRESERVE,  # keeps BatchNorm out of the convs: weight names survive
        )
    return buffer.getvalue()


class _quiet:
    """Silence the exporter's deprecation chatter (the TorchScript exporter handles these graphs fine)."""

    def __enter__(self) -> None:
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)


def _qdq(graph, tensor: str, scale: float, zero: int, tag: str) -> str:  # noqa: ANN001 - onnx GraphProto
    """Append Q and DQ nodes for `tensor` (uint8, per tensor); returns the dequantized tensor's name."""
    from onnx import TensorProto, helper, numpy_helper

    scale_name, zero_name = f"{tag}_scale", f"{tag}_zero_point"
    graph.initializer.append(numpy_helper.from_array(np.array(scale, dtype=np.float32), scale_name))
    graph.initializer.append(helper.make_tensor(zero_name, TensorProto.UINT8, [], [zero]))
    quantized, restored = f"{tag}_q", f"{tag}_dq"
    graph.node.append(helper.make_node("QuantizeLinear", [tensor, scale_name, zero_name], [quantized], name=f"{tag}_Q"))
    graph.node.append(
        helper.make_node("DequantizeLinear", [quantized, scale_name, zero_name], [restored], name=f"{tag}_DQ")
    )
    return restored


def _int_initializer_dq(graph, array: np.ndarray, scales: np.ndarray, tag: str) -> str:  # noqa: ANN001
    """An integer initializer behind a per-channel (axis 0) DequantizeLinear; returns the float tensor's name."""
    from onnx import helper, numpy_helper

    graph.initializer.append(numpy_helper.from_array(array, f"{tag}_int"))
    graph.initializer.append(numpy_helper.from_array(scales.astype(np.float32), f"{tag}_scale"))
    zero = np.zeros(scales.shape, dtype=array.dtype)
    graph.initializer.append(numpy_helper.from_array(zero, f"{tag}_zero_point"))
    graph.node.append(
        helper.make_node(
            "DequantizeLinear",
            [f"{tag}_int", f"{tag}_scale", f"{tag}_zero_point"],
            [f"{tag}_dq"],
            name=f"{tag}_DQ",
            axis=0,
        )
    )
    return f"{tag}_dq"


def _grid(low: float, high: float) -> tuple[float, int]:
    """uint8 scale and zero point covering [low, high] (widened to include 0, as ONNX grids must)."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = max(high - low, 1e-8) / 255.0
    return scale, int(np.clip(round(-low / scale), 0, 255))


def _quantize_output(graph, node, scale: float, zero: int, tag: str) -> str:  # noqa: ANN001 - onnx protos
    """Put a Q/DQ pair on a node's first output and point every reader (and the graph output) at its DQ."""
    import onnx

    produced = node.output[0]
    node.output[0] = f"{tag}_float"
    restored = _qdq(graph, node.output[0], scale, zero, tag)
    for reader in graph.node:  # original readers and Q nodes already added for them
        for i, tensor in enumerate(reader.input):
            if tensor == produced:
                reader.input[i] = restored
    if any(out.name == produced for out in graph.output):
        graph.node.append(onnx.helper.make_node("Identity", [restored], [produced], name=f"{tag}_id"))
    return restored


def _reader_grid(graph, tensor: str, input_grids: dict[str, tuple[float, int]]) -> tuple[float, int] | None:  # noqa: ANN001
    """The one input grid shared by all readers of `tensor` when every reader is a rewritten conv input Q."""
    readers = [n for n in graph.node if tensor in n.input]
    grids = {input_grids.get(n.name) for n in readers}
    if readers and None not in grids and len(grids) == 1:
        return grids.pop()
    return None


def _feeds_output_only_by_permutation(graph, tensor: str) -> bool:  # noqa: ANN001
    """True when `tensor` reaches the graph output through pixel shuffle / identity only (the SR image itself)."""
    outputs = {o.name for o in graph.output}
    while tensor not in outputs:
        readers = [n for n in graph.node if tensor in n.input]
        if len(readers) != 1 or readers[0].op_type not in ("DepthToSpace", "Identity"):
            return False
        tensor = readers[0].output[0]
    return True


def _rewrite(  # noqa: ANN001
    onnx_model, params: dict[str, ConvQuantParams], ranges: dict[str, tuple], report: ExportReport, layout: bool
) -> None:
    """Insert the Q/DQ groups around every quantized conv of the exported float graph (in place).

    Conv inputs and weights first, so that output grids can be read off the readers; then the outputs: the
    simulated output quantizer's grid when the model has one; else the image grid (1/255) for the conv that
    makes the SR image; else the readers' shared input grid; else the calibrated range. A module called several
    times gets its Q/DQ groups at every call (one weight initializer). Then narrow convs are widened and
    DequantizeLinear nodes are moved past the ops that commute with them; with `layout`, wide grouped convs run
    as one branch per group and pixel shuffles channels-last (`layout_rewrites`).
    """
    graph = onnx_model.graph
    by_weight: dict[str, list] = {}  # a module called several times (CARN-M's shared unit) has one node per call
    for node in graph.node:
        transposed = node.op_type == "Gemm" and any(a.name == "transB" and a.i == 1 for a in node.attribute)
        if (node.op_type == "Conv" or transposed) and len(node.input) > 1:
            by_weight.setdefault(node.input[1], []).append(node)
    missing = [name for name in params if f"{name}.weight" not in by_weight]
    if missing:
        raise SrquantError(f"no Conv or Gemm node reads the weight of {', '.join(missing[:3])} in the exported graph")
    calls = [
        (name, node, name.replace(".", "_") + (f"_call{k}" if k else ""))
        for name in params
        for k, node in enumerate(by_weight[f"{name}.weight"])
    ]
    input_grids: dict[str, tuple[float, int]] = {}  # Q node name -> grid, for the conv inputs
    weights: dict[str, tuple[str, str | None]] = {}  # module -> its weight and bias DQ outputs, made once
    for name, node, tag in calls:
        p = params[name]
        node.input[0] = _qdq(graph, node.input[0], p.input_scale, p.input_zero_point, f"{tag}_in")
        input_grids[f"{tag}_in_Q"] = (p.input_scale, p.input_zero_point)
        report.convs.append(name)
        dense = _densify(_groups(node), p.weight_codes.shape[0], layout)
        if name not in weights:
            if not p.weight_exact:
                report.regridded_weights.append(name)
            base = name.replace(".", "_")
            codes = _dense_codes(p.weight_codes, _groups(node)) if dense else p.weight_codes
            weight = _int_initializer_dq(graph, codes, p.weight_scales, f"{base}_w")
            bias = None
            if len(node.input) > 2 and node.input[2]:
                bias_scale = (p.input_scale * p.weight_scales.astype(np.float64)).astype(np.float32)
                bias_codes = np.round(p.bias.astype(np.float64) / bias_scale).astype(np.int32)
                bias = _int_initializer_dq(graph, bias_codes, bias_scale, f"{base}_b")
            weights[name] = (weight, bias)
        if dense:
            _set_groups(node, 1)  # its weight is the dense, block-diagonal one
        node.input[1] = weights[name][0]
        if weights[name][1] is not None:
            node.input[2] = weights[name][1]
    for name, node, tag in calls:
        shared = _reader_grid(graph, node.output[0], input_grids)
        if params[name].output_grid is not None:
            grid = params[name].output_grid
            report.simulated_outputs.append(name)
        elif _feeds_output_only_by_permutation(graph, node.output[0]):
            grid = (1.0 / 255.0, 0)  # the output image: the 8-bit grid it is saved on anyway
            report.image_outputs.append(name)
        elif shared is not None:
            grid = shared
            report.shared_outputs.append(name)
        else:
            grid = _grid(*ranges[name])
            report.calibrated_outputs.append(name)
        _quantize_output(graph, node, *grid, f"{tag}_out")
    report.widened_convs = _widen_narrow_convs(graph, calls)
    report.sunk_dequantize = sink_dequantize(graph)
    report.uint8_requantize = requantize_in_uint8(graph)
    report.uint8_concats = concat_in_uint8(graph)
    if layout:
        report.branched_convs = split_grouped_chains(graph)
        report.nhwc_shuffles = nhwc_pixel_shuffle(graph)
    remove_dead_nodes(graph)  # the float weights the integer ones replaced, dequantizers nothing reads now
    sort_topologically(graph)


DENSE_MAX_GROUPS = 4  # grouped convs up to this many groups run as dense convs with zero blocks


def _densify(groups: int, out_channels: int, layout: bool) -> bool:
    """True for a grouped conv that runs dense: up to 4 groups, and not one that the layout rewrites split into
    one conv per group (groups of at least `BRANCH_MIN_GROUP_OUTPUTS` outputs)."""
    if groups == 1 or groups > DENSE_MAX_GROUPS:
        return False
    return not (layout and out_channels // groups >= BRANCH_MIN_GROUP_OUTPUTS)


def _groups(node) -> int:  # noqa: ANN001 - onnx NodeProto
    """The `group` attribute of a Conv node (1 when absent)."""
    return next((a.i for a in node.attribute if a.name == "group"), 1)


def _set_groups(node, groups: int) -> None:  # noqa: ANN001 - onnx NodeProto
    """Set a Conv node's `group` attribute."""
    from onnx import helper

    kept = [a for a in node.attribute if a.name != "group"]
    del node.attribute[:]
    node.attribute.extend([*kept, helper.make_attribute("group", groups)])


def _dense_codes(codes: np.ndarray, groups: int) -> np.ndarray:
    """A grouped conv's int8 weight as the equivalent dense one: each group's block on the diagonal, zeros
    elsewhere. onnxruntime's int8 kernel ran a dense 64 -> 64 conv faster than the same conv in 4 groups
    (benchmarks/export_microbench.py), though the dense one has 4x the multiply-adds; the result is exact."""
    if groups == 1 or groups > DENSE_MAX_GROUPS:
        return codes
    out, per_group = codes.shape[0], codes.shape[1]
    dense = np.zeros((out, per_group * groups, *codes.shape[2:]), dtype=codes.dtype)
    rows = out // groups
    for g in range(groups):
        dense[g * rows : (g + 1) * rows, g * per_group : (g + 1) * per_group] = codes[g * rows : (g + 1) * rows]
    return dense


WIDE_CONV_CHANNELS = 16  # onnxruntime's QLinearConv: 64 -> 16 channels took 58 ms where 64 -> 3 took 102 ms


def _widen_narrow_convs(graph, calls: Sequence[tuple[str, object, str]]) -> list[str]:  # noqa: ANN001 - onnx GraphProto
    """Give each ungrouped quantized conv with fewer than 16 outputs zero weights up to 16, and slice each call's
    uint8 output back to its channels: the same values, on a faster integer kernel (the 3-channel convs that
    make the SR image). `calls` are `_rewrite`'s (module name, Conv node, tag) triples. Returns the widened."""
    from onnx import helper, numpy_helper

    inits = {init.name: init for init in graph.initializer}
    dequantizers = {node.name: node for node in graph.node if node.op_type == "DequantizeLinear"}
    by_module: dict[str, list[tuple[object, str]]] = {}
    for name, node, tag in calls:
        by_module.setdefault(name, []).append((node, tag))
    widened = []
    for name, module_calls in by_module.items():
        base = name.replace(".", "_")
        out = numpy_helper.to_array(inits[f"{base}_w_int"]).shape[0]
        if out >= WIDE_CONV_CHANNELS or _groups(module_calls[0][0]) != 1 or module_calls[0][0].op_type != "Conv":
            continue
        extra = WIDE_CONV_CHANNELS - out
        for part in ("w", "b") if f"{base}_b_int" in inits else ("w",):
            for key, zero in (("int", True), ("scale", False), ("zero_point", True)):
                init = inits[f"{base}_{part}_{key}"]
                array = numpy_helper.to_array(init)
                fill = np.zeros_like(array[:1]) if zero else array[-1:]  # scales copied: bias = input x weight
                init.CopyFrom(numpy_helper.from_array(np.concatenate([array, np.repeat(fill, extra, 0)]), init.name))
        for key, value in (("starts", 0), ("ends", out), ("axes", 1)):
            graph.initializer.append(numpy_helper.from_array(np.array([value], dtype=np.int64), f"{base}_slice_{key}"))
        for _, tag in module_calls:
            dq = dequantizers[f"{tag}_out_DQ"]  # the only reader of the output's QuantizeLinear
            sliced = f"{dq.input[0]}_sliced"
            slices = [f"{base}_slice_{key}" for key in ("starts", "ends", "axes")]
            graph.node.append(helper.make_node("Slice", [dq.input[0], *slices], [sliced], name=f"{tag}_out_slice"))
            dq.input[0] = sliced
        widened.append(name)
    return widened


def export_gaps(model: nn.Module, params: dict[str, ConvQuantParams] | None = None) -> list[str]:
    """What keeps a quantized model from an exact and fast integer graph, each with the switch that fixes it.

    Exact: symmetric weights (zero point 0), weight codes within +-64 (onnxruntime's u8 x s8 kernels on CPUs
    without VNNI add code pairs in int16 and saturate beyond that: 7-bit weight grids are exact on every x86
    CPU), simulated layer outputs. Fast: the tensors between layers quantized where the architecture marks them.
    """
    params = params if params is not None else conv_params(model)
    gaps = []
    regridded = [name for name, p in params.items() if not p.weight_exact]
    if regridded:
        gaps.append(f"{len(regridded)} layers have asymmetric weights (use --weight-quantizer symmetric)")
    wide = [name for name, p in params.items() if p.weight_exact and p.peak_code > SATURATION_FREE_CODE]
    if wide:
        gaps.append(
            f"{len(wide)} layers have weight codes beyond +-{SATURATION_FREE_CODE}, which int8 kernels without VNNI "
            "saturate (use 7-bit weights: --deploy onnxruntime)"
        )
    unaligned = [name for name, p in params.items() if not p.input_exact]
    if unaligned:
        gaps.append(f"{len(unaligned)} input grids have no integer zero point (use --output-bits 8)")
    unsimulated = [name for name, p in params.items() if p.output_grid is None]
    if unsimulated:
        gaps.append(f"{len(unsimulated)} layer outputs are not simulated (use --output-bits 8)")
    quantized = dict(quantizers(model, every_name=True))
    taps = [name for name, _ in model.named_modules() if name.endswith(GLUE_HOOK_SUFFIX)]
    float_glue = [name for name in taps if name not in quantized]
    if float_glue:
        gaps.append(f"{len(float_glue)} tensors between layers stay float (use --glue-bits 8)")
    return gaps


def export_onnx(
    model: nn.Module,
    path: str | Path,
    calib_inputs: Sequence[torch.Tensor] | None = None,
    size: tuple[int, int] | None = None,
    layout_rewrites: bool = True,
    allow_inexact: bool = False,
) -> ExportReport:
    """Write `model` (fixed-bit, A8, weights <= 8 bit) as an integer QDQ ONNX graph; returns what was done.

    Networks that pad inside (window transformers) are exported for one LR `size`; the others take any size.
    `layout_rewrites` (exact) splits wide grouped convs per group and writes pixel shuffles channels-last.
    A model whose integer graph would not compute what it computes, or would run float between its integer
    kernels, is refused with the missing pieces named (`export_gaps`), unless `allow_inexact`.
    """
    try:
        import onnx
    except ImportError as err:
        raise SrquantError("ONNX export needs the deploy extra: pip install 'srquant[deploy]'") from err
    model = model.eval()
    params = conv_params(model)
    gaps = export_gaps(model, params)
    if gaps and not allow_inexact:
        raise SrquantError(f"this model would export inexact or slow: {'; '.join(gaps)} (or pass --allow-inexact)")
    dynamic = int(getattr(model, "pad_multiple", 1)) == 1
    if not dynamic and size is None:
        raise SrquantError(f"{type(model).__name__} pads inside its forward: give the LR size to export for")
    height, width = size if size is not None else (64, 64)
    sample = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    need = [name for name, p in params.items() if p.output_grid is None]
    if need and not calib_inputs:
        raise SrquantError(
            f"{len(need)} quantized layers (first: {need[0]}) have no simulated output quantizer: give calibration "
            "images for their output ranges, or quantize with --output-bits 8 so the model simulates them"
        )
    ranges = output_ranges(model, need, calib_inputs or [])
    glue = glue_grids(model)
    linears = [name for name in params if isinstance(model.get_submodule(name), nn.Linear)]
    onnx_model = onnx.load_from_string(_float_onnx(model, sample, dynamic, glue, linears))
    report = ExportReport(dynamic_axes=dynamic, glue=sorted(glue))
    _rewrite(onnx_model, params, ranges, report, layout_rewrites)
    tables = report.uint8_requantize or report.uint8_concats
    if tables and not any(o.domain == "com.microsoft" for o in onnx_model.opset_import):
        onnx_model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    onnx_model.producer_name = "srquant"
    onnx.checker.check_model(onnx_model)
    atomic_write(path, lambda tmp: onnx.save(onnx_model, tmp))
    return report


def float_onnx_bytes(model: nn.Module, size: tuple[int, int] | None = None) -> bytes:
    """The network with quantization off as plain float ONNX bytes (the FP32 baseline); networks that pad
    inside their forward are traced for one LR `size`, the others with dynamic height and width."""
    dynamic = int(getattr(model, "pad_multiple", 1)) == 1
    height, width = size if size is not None else (64, 64)
    sample = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    return _float_onnx(model.eval(), sample, dynamic)


def rewrite_float_graph(data: bytes, branch_min_group_outputs: int | None = None) -> tuple[bytes, list[str]]:
    """A float graph with the integer graph's exact layout rewrites (grouped convs with at least
    `branch_min_group_outputs` outputs per group as branches, channels-last pixel shuffles), and what they
    changed (empty when nothing applies)."""
    import onnx

    graph_model = onnx.load_from_string(data)
    changed = split_grouped_chains(graph_model.graph, branch_min_group_outputs)
    changed += nhwc_pixel_shuffle(graph_model.graph)
    sort_topologically(graph_model.graph)
    onnx.checker.check_model(graph_model)
    return graph_model.SerializeToString(), changed


def export_float_onnx(
    model: nn.Module,
    path: str | Path,
    size: tuple[int, int] | None = None,
    layout_rewrites: bool = False,
    branch_min_group_outputs: int | None = None,
) -> list[str]:
    """Write the float graph (`float_onnx_bytes`), with the layout rewrites if asked (`rewrite_float_graph`);
    returns what they changed."""
    data, changed = float_onnx_bytes(model, size), []
    if layout_rewrites:
        data, changed = rewrite_float_graph(data, branch_min_group_outputs)
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
    return changed
