"""Exact rewrites of an integer QDQ graph that keep tensors in uint8 between onnxruntime's integer kernels.

- `sink_dequantize`: a DequantizeLinear moves past the pixel shuffle, split, nearest resize or ReLU that reads
  it, so that op runs on uint8 (ReLU as Max with the zero point).
- `requantize_in_uint8`: a DequantizeLinear -> QuantizeLinear pair between two uint8 grids becomes a 256-entry
  table (onnxruntime's QLinearLeakyRelu with alpha 1), not a float round trip.
- `concat_in_uint8`: a quantized concatenation becomes a table per input whose grid differs, then a plain
  uint8 Concat (faster than onnxruntime's QLinearConcat, with the same codes).

Each computes the codes of the QDQ graph it replaces; tests compare the outputs bit for bit.
"""

from __future__ import annotations

import numpy as np

from srquant.deploy.layout_rewrites import GraphIndex

SINKABLE = ("DepthToSpace", "Relu", "Split", "Resize")  # exact on a uint8 grid (Resize in nearest mode only)


def _sinkable(node) -> bool:  # noqa: ANN001 - onnx NodeProto
    """True for ops that commute with dequantization: permutations and selections of values, and ReLU."""
    if node.op_type == "Resize":
        mode = next((a.s for a in node.attribute if a.name == "mode"), b"nearest")
        return mode == b"nearest"
    return node.op_type in SINKABLE


def sink_dequantize(graph) -> list[str]:  # noqa: ANN001 - onnx GraphProto
    """Move each per-tensor DequantizeLinear past the DepthToSpace / Split / nearest Resize / ReLU op that is its
    only reader.

    `DQ -> DepthToSpace` becomes `DepthToSpace -> DQ` (moving, splitting or repeating values commutes with an
    elementwise map; a Split gets one DQ per output) and `DQ -> Relu` becomes `Max(q, zero point) -> DQ`
    (relu(s(q - z)) = s(max(q, z) - z) for s > 0): the same values, with the op on uint8. Repeated while
    something moves; returns the ops now on uint8.
    """
    from onnx import helper

    outputs = {o.name for o in graph.output}
    moved: list[str] = []
    progress = True
    while progress:
        progress = False
        readers: dict[str, list] = {}
        for node in graph.node:
            for tensor in set(node.input):
                readers.setdefault(tensor, []).append(node)
        for dq in list(graph.node):
            per_channel = any(a.name == "axis" for a in dq.attribute)
            if dq.op_type != "DequantizeLinear" or dq.output[0] in outputs or per_channel:
                continue
            found = readers.get(dq.output[0], [])
            if len(found) != 1 or not _sinkable(found[0]):
                continue
            op = found[0]
            if op.input[0] != dq.output[0] or dq.output[0] in op.input[1:]:
                continue
            if op.op_type == "Relu":
                op.op_type = "Max"
                op.input.append(dq.input[2])  # the zero point: the integer code of 0.0
            op.input[0] = dq.input[0]
            for index, float_out in enumerate(list(op.output)):
                op.output[index] = f"{float_out}_uint8"
                if index == 0:
                    dq.input[0], dq.output[0] = op.output[0], float_out
                else:
                    extra = helper.make_node(
                        "DequantizeLinear", [op.output[index], *dq.input[1:]], [float_out], name=f"{dq.name}_{index}"
                    )
                    graph.node.append(extra)
            moved.append(op.name)
            progress = True
            break  # the readers map is stale now
    return moved


def _constant_values(graph) -> dict[str, np.ndarray]:  # noqa: ANN001 - onnx GraphProto
    """Every initializer and Constant-node output of the graph as an array (the trace writes glue grids as
    Constant nodes, the rewrite as initializers)."""
    from onnx import numpy_helper

    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


class _Uint8Grids:
    """Reads the per-tensor uint8 grid (scale, zero point) of Q / DQ nodes whose grid is constant."""

    def __init__(self, graph) -> None:  # noqa: ANN001 - onnx GraphProto
        self.values = _constant_values(graph)

    def __call__(self, node) -> tuple[float, int] | None:  # noqa: ANN001 - onnx NodeProto
        if len(node.input) != 3:
            return None
        scale, zero = (self.values.get(t) for t in node.input[1:3])
        if scale is None or zero is None or scale.size != 1 or zero.size != 1 or zero.dtype != np.uint8:
            return None
        return float(scale), int(zero)


def _regrid_table(dq, q, output: str, name: str):  # noqa: ANN001, ANN202 - onnx protos
    """onnxruntime's `QLinearLeakyRelu` with alpha 1 from the DequantizeLinear's grid to the QuantizeLinear's:
    a 256-entry table built from the same float dequantize / quantize steps, so it gives the same codes as the
    pair (a test compares all 256 codes on many grid pairs)."""
    from onnx import helper

    inputs = [dq.input[0], dq.input[1], dq.input[2], q.input[1], q.input[2]]
    return helper.make_node("QLinearLeakyRelu", inputs, [output], name=name, domain="com.microsoft", alpha=1.0)


def requantize_in_uint8(graph) -> list[str]:  # noqa: ANN001 - onnx GraphProto
    """Replace each `DequantizeLinear -> QuantizeLinear` pair between two different per-tensor uint8 grids by a
    uint8 table (`_regrid_table`).

    Such pairs are left where a tensor feeds a conv whose input grid is not its own (CARN-M's shared residual
    unit reads three tensors on one grid). onnxruntime fuses neither away, so they ran as a float round trip.
    Returns the replaced QuantizeLinear nodes.
    """
    grid, producers = _Uint8Grids(graph), GraphIndex(graph).producer  # stays valid: only Q nodes are removed
    replaced = []
    for q in [n for n in graph.node if n.op_type == "QuantizeLinear"]:
        dq = producers.get(q.input[0])
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        source, target = grid(dq), grid(q)
        if source is None or target is None or source == target:  # equal grids: onnxruntime drops the pair itself
            continue
        graph.node.insert(list(graph.node).index(q), _regrid_table(dq, q, q.output[0], f"{q.name}_requantize"))
        graph.node.remove(q)
        replaced.append(q.name)
    return replaced


def concat_in_uint8(graph) -> list[str]:  # noqa: ANN001 - onnx GraphProto
    """Rewrite `DequantizeLinear`s -> `Concat` -> `QuantizeLinear` (per-tensor uint8 grids) as a uint8 table per
    input whose grid differs from the output's, then a plain uint8 `Concat`.

    onnxruntime fuses the QDQ form into `QLinearConcat`, which was measured slower than the tables and the
    copy (benchmarks/export_microbench.py). The codes are those of the QDQ form: each element is dequantized
    and quantized once, as in the table. Returns the rewritten Concat nodes.
    """
    from onnx import helper

    grid, index = _Uint8Grids(graph), GraphIndex(graph)  # stays valid: only Concat, Q are removed
    rewritten = []
    for concat in [n for n in graph.node if n.op_type == "Concat"]:
        q = index.sole_reader(concat.output[0])
        if q is None or q.op_type != "QuantizeLinear":
            continue
        sources = [index.producer.get(t) for t in concat.input]
        target = grid(q)
        if target is None or any(d is None or d.op_type != "DequantizeLinear" or grid(d) is None for d in sources):
            continue
        inputs = []
        for k, dq in enumerate(sources):
            if grid(dq) == target:
                inputs.append(dq.input[0])  # already on the output grid: copied as it is
                continue
            regridded = f"{concat.name}_input{k}_uint8"
            graph.node.append(_regrid_table(dq, q, regridded, f"{concat.name}_input{k}_regrid"))
            inputs.append(regridded)
        axis = next(a.i for a in concat.attribute if a.name == "axis")
        graph.node.append(helper.make_node("Concat", inputs, list(q.output), name=f"{concat.name}_uint8", axis=axis))
        graph.node.remove(q)
        graph.node.remove(concat)
        rewritten.append(concat.name)
    return rewritten
