"""Exact layout rewrites of an exported ONNX graph (float or integer) that onnxruntime runs faster on this CPU.

Two rewrites, each a pure reordering of the same arithmetic (tests compare integer outputs bit for bit):

- `split_grouped_chains`: a grouped conv whose groups are wide runs as one ordinary conv per group on a slice
  of its input. Consecutive grouped convs joined only by per-tensor elementwise ops and pixel shuffles keep
  their groups apart (group g of one conv reads only group g of the previous one), so the branches stay
  separate until the chain ends and are concatenated once. onnxruntime's int8 kernel has no fast grouped path:
  it ran CARN-M's 4-group convs densified (4x the multiply-adds) faster than grouped, and one conv per group
  faster still (benchmarks/export_microbench.py).
- `nhwc_pixel_shuffle`: onnxruntime runs convs channels-last (int8 always, float in its blocked layout) but
  DepthToSpace only on NCHW, so each pixel shuffle costs two full-size transposes plus a byte-wise shuffle. The
  conv that feeds the shuffle gets its output channels reordered (pixel offset outermost, channel innermost),
  and the shuffle is written as channels-last Reshape / Transpose / Reshape that moves whole channel runs; the
  transposes onnxruntime adds around its channels-last convs then cancel against ours.
"""

from __future__ import annotations

import numpy as np

from srquant.errors import SrquantError

LINK_OPS = ("QuantizeLinear", "DequantizeLinear", "Relu", "Max", "DepthToSpace")
"""Ops that may join two grouped convs of one chain: per-tensor elementwise maps and CRD pixel shuffles."""

BRANCH_MIN_GROUP_OUTPUTS = 16
"""Grouped convs with at least this many outputs per group run as one conv per group. Narrower ones are left
to the caller, which densifies them: onnxruntime's int8 kernel is slow on convs with few outputs (the same
bound as the export's narrow-conv widening)."""


def _attr(node, name: str, default: object = None) -> object:  # noqa: ANN001 - onnx NodeProto
    """A node attribute's value, or `default`."""
    from onnx import helper

    found = next((a for a in node.attribute if a.name == name), None)
    return default if found is None else helper.get_attribute_value(found)


class GraphIndex:
    """Producer / reader / initializer look-ups over a GraphProto, rebuilt after each structural change."""

    def __init__(self, graph) -> None:  # noqa: ANN001 - onnx GraphProto
        self.graph = graph
        self.refresh()

    def refresh(self) -> None:
        """Re-index after nodes were added or removed."""
        self.producer = {t: n for n in self.graph.node for t in n.output}
        self.readers: dict[str, list] = {}
        for node in self.graph.node:
            for tensor in set(node.input):
                self.readers.setdefault(tensor, []).append(node)
        self.inits = {init.name: init for init in self.graph.initializer}
        self.outputs = {o.name for o in self.graph.output}

    def array(self, name: str) -> np.ndarray:
        """An initializer as a numpy array."""
        from onnx import numpy_helper

        return numpy_helper.to_array(self.inits[name])

    def set_array(self, name: str, array: np.ndarray) -> None:
        """Replace (or add) an initializer."""
        from onnx import numpy_helper

        tensor = numpy_helper.from_array(np.ascontiguousarray(array), name)
        if name in self.inits:
            self.inits[name].CopyFrom(tensor)
        else:
            self.graph.initializer.append(tensor)
            self.inits[name] = self.graph.initializer[-1]

    def sole_reader(self, tensor: str):  # noqa: ANN201 - onnx NodeProto or None
        """The one node reading `tensor` (None if several, none, or it is a graph output)."""
        found = self.readers.get(tensor, [])
        return found[0] if len(found) == 1 and tensor not in self.outputs else None

    def is_scalar(self, tensor: str) -> bool:
        """True for a one-element initializer (a per-tensor scale, zero point or constant)."""
        return tensor in self.inits and int(np.prod(self.inits[tensor].dims)) == 1

    def is_link(self, node) -> bool:  # noqa: ANN001 - onnx NodeProto
        """True if `node` maps its first input elementwise per tensor, or is a CRD pixel shuffle."""
        if node.op_type not in LINK_OPS:
            return False
        if node.op_type == "DepthToSpace":
            return _attr(node, "mode", b"DCR") == b"CRD"
        return all(self.is_scalar(t) for t in node.input[1:] if t)

    def channel_params(self, conv) -> list[str] | None:  # noqa: ANN001 - onnx NodeProto
        """The initializers holding a Conv's per-output-channel parameters: weight and bias, either the
        initializers themselves (float graph) or those behind a per-channel DequantizeLinear (integer graph).
        None if some parameter is computed otherwise."""
        found: list[str] = []
        for tensor in conv.input[1:3]:
            if not tensor:
                continue
            if tensor in self.inits:
                found.append(tensor)
                continue
            dq = self.producer.get(tensor)
            if dq is None or dq.op_type != "DequantizeLinear" or not all(t in self.inits for t in dq.input):
                return None
            found += [t for t in dq.input if not self.is_scalar(t)]
        return found


def _conv_out_channels(g: GraphIndex, conv) -> int | None:  # noqa: ANN001 - onnx NodeProto
    """Output channels of a Conv whose weight is an initializer or a dequantized one."""
    weight = conv.input[1]
    if weight not in g.inits:
        dq = g.producer.get(weight)
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in g.inits:
            return None
        weight = dq.input[0]
    return int(g.inits[weight].dims[0])


def _follow_links(g: GraphIndex, tensor: str, stop_at_dequantize: bool) -> tuple[list, object]:
    """Walk from `tensor` through single-reader link ops; returns the ops passed and the node that ended the
    walk (a reader that is not a link op, or None)."""
    path = []
    while True:
        node = g.sole_reader(tensor)
        if node is None or not g.is_link(node) or node.input[0] != tensor:
            return path, node
        if stop_at_dequantize and node.op_type == "DequantizeLinear":
            return path, node
        path.append(node)
        tensor = node.output[0]


def _chains(g: GraphIndex, min_group_outputs: int) -> list[list]:
    """Maximal chains [conv, links, conv, links, ...] of wide grouped convs with equal group counts."""
    wide = {}
    for node in g.graph.node:
        groups = int(_attr(node, "group", 1))
        out = _conv_out_channels(g, node) if node.op_type == "Conv" else None
        if groups > 1 and out is not None and out // groups >= min_group_outputs and g.channel_params(node):
            wide[node.name] = node
    following: dict[str, tuple[list, object]] = {}
    for name, conv in wide.items():
        path, end = _follow_links(g, conv.output[0], stop_at_dequantize=False)
        if end is not None and end.name in wide and _attr(end, "group") == _attr(conv, "group"):
            if end.input[0] == (path[-1].output[0] if path else conv.output[0]):
                following[name] = (path, end)
    heads = set(wide) - {end.name for _, end in following.values()}
    chains = []
    for head in sorted(heads):
        chain, name = [wide[head]], head
        while name in following:
            path, end = following[name]
            chain += [*path, end]
            name = end.name
        chains.append(chain)
    return chains


def _branch_param(g: GraphIndex, tensor: str, group: int, groups: int, created: list) -> str:
    """Group `group`'s rows of a conv parameter (an initializer or a per-channel DequantizeLinear of ones)."""
    from onnx import helper

    def rows(name: str) -> str:
        target = f"{name}_g{group}"
        if target not in g.inits:
            array = g.array(name)
            size = array.shape[0] // groups
            g.set_array(target, array[group * size : (group + 1) * size])
        return target

    if tensor in g.inits:
        return rows(tensor)
    dq = g.producer[tensor]
    target = f"{tensor}_g{group}"
    if target not in g.producer and all(target not in n.output for n in created):
        inputs = [t if g.is_scalar(t) else rows(t) for t in dq.input]
        created.append(helper.make_node("DequantizeLinear", inputs, [target], name=f"{dq.name}_g{group}", axis=0))
    return target


def split_grouped_chains(graph, min_group_outputs: int | None = None) -> list[str]:  # noqa: ANN001
    """Run chains of wide grouped convs as one branch per group (see the module docstring); returns the
    rewritten convs. The chain's input is split once (before its DequantizeLinear when it has one, so the
    split moves uint8) and the branches are concatenated after the last conv's trailing link ops, before any
    DequantizeLinear."""
    from onnx import helper

    g = GraphIndex(graph)
    done: list[str] = []
    minimum = BRANCH_MIN_GROUP_OUTPUTS if min_group_outputs is None else min_group_outputs
    for chain in _chains(g, minimum):
        groups = int(_attr(chain[0], "group"))
        tail, _ = _follow_links(g, chain[-1].output[0], stop_at_dequantize=True)
        body = list(chain) + tail
        head = chain[0]
        source = head.input[0]
        lead = g.producer.get(source)
        if lead is not None and lead.op_type == "DequantizeLinear" and g.is_link(lead) and g.sole_reader(source):
            body.insert(0, lead)
            source = lead.input[0]
        last = body[-1].output[0]
        if any(t in g.outputs for node in body for t in node.output if t != last):
            continue  # an inner tensor is a graph output: leave this chain as it is
        created: list = []
        split_outputs = [f"{source}_split{k}" for k in range(groups)]
        created.append(helper.make_node("Split", [source], split_outputs, name=f"{head.name}_split", axis=1))
        branch_outputs = []
        for k in range(groups):
            renamed = {source: split_outputs[k]}
            for node in body:
                inputs = [renamed.get(t, t) for t in node.input]
                if node.op_type == "Conv":
                    inputs[1:] = [_branch_param(g, t, k, groups, created) if t else t for t in node.input[1:]]
                outputs = [f"{t}_g{k}" for t in node.output]
                renamed.update(zip(node.output, outputs, strict=True))
                clone = helper.make_node(node.op_type, inputs, outputs, name=f"{node.name}_g{k}", domain=node.domain)
                clone.attribute.extend(a for a in node.attribute if a.name != "group")
                created.append(clone)
            branch_outputs.append(renamed[last])
        created.append(helper.make_node("Concat", branch_outputs, [last], name=f"{head.name}_concat", axis=1))
        for node in body:
            graph.node.remove(node)
        graph.node.extend(created)
        done += [node.name for node in chain if node.op_type == "Conv"]
        g.refresh()
    remove_dead_nodes(graph)
    return done


def _permute_output_channels(g: GraphIndex, conv, order: np.ndarray) -> None:  # noqa: ANN001 - onnx NodeProto
    """Reorder a conv's output channels in place: new channel k is old channel order[k]."""
    for name in g.channel_params(conv) or []:
        g.set_array(name, g.array(name)[order])


def _exclusive(g: GraphIndex, conv) -> bool:  # noqa: ANN001 - onnx NodeProto
    """True if the conv's per-channel parameters are read by it alone (a shared module's are not)."""
    if not g.channel_params(conv):
        return False
    for tensor in (t for t in conv.input[1:3] if t):
        if len(g.readers.get(tensor, [])) != 1:
            return False
        dq = g.producer.get(tensor)
        if dq is not None and any(len(g.readers.get(t, [])) != 1 for t in dq.input if not g.is_scalar(t)):
            return False
    return True


def _shuffle_source(g: GraphIndex, shuffle):  # noqa: ANN001, ANN202 - onnx NodeProto
    """The Conv feeding a pixel shuffle through single-reader per-tensor elementwise ops, or None."""
    tensor = shuffle.input[0]
    while True:
        node = g.producer.get(tensor)
        if node is None or g.sole_reader(tensor) is None:
            return None
        if node.op_type == "Conv":
            return node
        if node.op_type == "DepthToSpace" or not g.is_link(node):
            return None
        tensor = node.input[0]


def nhwc_pixel_shuffle(graph) -> list[str]:  # noqa: ANN001 - onnx GraphProto
    """Rewrite each CRD pixel shuffle fed by a conv as channels-last Reshape / Transpose / Reshape, with the
    conv's output channels reordered to match (see the module docstring); returns the rewritten shuffles."""
    from onnx import helper

    g = GraphIndex(graph)
    done: list[str] = []
    for shuffle in [n for n in graph.node if n.op_type == "DepthToSpace" and _attr(n, "mode", b"DCR") == b"CRD"]:
        conv = _shuffle_source(g, shuffle)
        if conv is None or not _exclusive(g, conv):
            continue
        r, groups = int(_attr(shuffle, "blocksize")), int(_attr(conv, "group", 1))
        channels = _conv_out_channels(g, conv) // (r * r)
        per_group = channels // groups
        # new channel ((g * r + i) * r + j) * per_group + c  <-  old channel (g * per_group + c) * r * r + i * r + j
        order = np.array(
            [
                (k * per_group + c) * r * r + i * r + j
                for k in range(groups)
                for i in range(r)
                for j in range(r)
                for c in range(per_group)
            ]
        )
        _permute_output_channels(g, conv, order)
        tag = f"{shuffle.name.strip('/').replace('/', '_')}_nhwc"
        x, y = shuffle.input[0], shuffle.output[0]
        if groups == 1:
            split_shape, interleave = [0, 0, 0, r, r, -1], [0, 1, 3, 2, 4, 5]  # (N,H,W,i,j,C) -> (N,H,i,W,j,C)
        else:
            split_shape, interleave = [0, 0, 0, groups, r, r, -1], [0, 1, 4, 2, 5, 3, 6]
        g.set_array(f"{tag}_split_shape", np.array(split_shape, np.int64))
        g.set_array(f"{tag}_factor", np.array([r], np.int64))
        g.set_array(f"{tag}_channels", np.array([channels], np.int64))
        nodes = [
            helper.make_node("Transpose", [x], [f"{tag}_in"], perm=[0, 2, 3, 1], name=f"{tag}_to_nhwc"),
            helper.make_node("Reshape", [f"{tag}_in", f"{tag}_split_shape"], [f"{tag}_split"], name=f"{tag}_split"),
            helper.make_node("Transpose", [f"{tag}_split"], [f"{tag}_moved"], perm=interleave, name=f"{tag}_move"),
            helper.make_node("Shape", [x], [f"{tag}_n"], start=0, end=1, name=f"{tag}_batch"),
            helper.make_node("Shape", [x], [f"{tag}_hw"], start=2, end=4, name=f"{tag}_size"),
            helper.make_node("Mul", [f"{tag}_hw", f"{tag}_factor"], [f"{tag}_hw_out"], name=f"{tag}_scale"),
            helper.make_node(
                "Concat", [f"{tag}_n", f"{tag}_hw_out", f"{tag}_channels"], [f"{tag}_shape"], axis=0, name=f"{tag}_cat"
            ),
            helper.make_node("Reshape", [f"{tag}_moved", f"{tag}_shape"], [f"{tag}_merged"], name=f"{tag}_merge"),
            helper.make_node("Transpose", [f"{tag}_merged"], [y], perm=[0, 3, 1, 2], name=f"{tag}_to_nchw"),
        ]
        graph.node.remove(shuffle)
        graph.node.extend(nodes)
        done.append(shuffle.name)
        g.refresh()
    return done


def remove_dead_nodes(graph) -> None:  # noqa: ANN001 - onnx GraphProto
    """Drop nodes none of whose outputs is read or is a graph output, and initializers nothing reads."""
    outputs = {o.name for o in graph.output}
    while True:
        read = {t for n in graph.node for t in n.input} | outputs
        dead = [n for n in graph.node if not any(t in read for t in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    read = {t for n in graph.node for t in n.input}
    keep = [init for init in graph.initializer if init.name in read]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def sort_topologically(graph) -> None:  # noqa: ANN001 - onnx GraphProto
    """Reorder nodes so every node follows the producers of its inputs (ONNX requires it)."""
    available = {i.name for i in graph.input} | {init.name for init in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(t in available for t in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise SrquantError(f"cannot order the exported graph: {rest[0].name} has an unknown input")
        pending = rest
    copies = [type(n)() for n in ordered]
    for copy, node in zip(copies, ordered, strict=True):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)
