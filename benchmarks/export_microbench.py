"""The onnxruntime measurements behind srquant's export rewrites (docs/deploy.md), on single ops and whole graphs.

    python benchmarks/export_microbench.py --assets ../shared/assets [--threads 2] [--runs 10]

- `QLinearConv` with 64 inputs and 3, 4, 8 or 16 outputs at 1024x1024: why narrow convs are widened to 16.
- Two 64 -> 64 3x3 `QLinearConv` at 256x256, groups 4 against dense: whether densifying grouped convs helps.
- uint8 nearest x2 upsampling of 24 channels, `Resize` against `Concat` + `DepthToSpace` (same values).
- Whole integer graphs with each rewrite on and off, side by side in one process, with a check that the
  outputs are equal: widening (CARN-M conv only, PAN with integer glue) and densifying grouped convs (CARN-M
  with integer glue); the W7A8 deploy recipe of `speed_table.py` (conv only: without glue, exported inexact).
- CARN-M's FP32 graph as exported against the same graph with dense weights: densifying is not a way to a
  faster FP32 baseline.
- CARN-M's 4-group upsampling conv as one conv per group, and the whole integer graph with the layout rewrites
  (grouped convs as branches, channels-last pixel shuffles) on and off; CARN-M's FP32 graph with the same
  rewrites, the candidates for the FP32 baseline.
Run it on an idle machine: the numbers are wall-clock medians.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from common import RESULTS, header, load_json, run_main, update_json
from speed_table import quantize_w7a8

from srquant import api
from srquant.deploy import onnx_export
from srquant.deploy.ort_runtime import ort_session
from srquant.deploy.speed import fp32_graphs, median_latencies, timed_in_fresh_process

OUT = RESULTS / "export_microbench.json"


def _session(nodes: list, inputs: list, initializers: list, threads: int):  # noqa: ANN202 - onnxruntime session
    """An onnxruntime session for a one-off graph with uint8 input `x` and output `y`."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    output = helper.make_tensor_value_info("y", TensorProto.UINT8, None)
    graph = helper.make_graph(nodes, "microbench", inputs, [output], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _qconv_initializers(out_channels: int, in_per_group: int) -> list:
    """Random int8 weights and fixed uint8 grids for a 3x3 QLinearConv."""
    from onnx import numpy_helper

    rng = np.random.default_rng(0)
    arrays = {
        "w": rng.integers(-127, 128, (out_channels, in_per_group, 3, 3)).astype(np.int8),
        "x_scale": np.array(0.02, np.float32),
        "x_zero": np.array(128, np.uint8),
        "w_scale": np.full(out_channels, 0.001, np.float32),
        "w_zero": np.zeros(out_channels, np.int8),
        "y_scale": np.array(0.05, np.float32),
        "y_zero": np.array(128, np.uint8),
    }
    return [numpy_helper.from_array(value, key) for key, value in arrays.items()]


def _qconv(source: str, target: str, groups: int = 1):  # noqa: ANN202 - onnx NodeProto
    """A 3x3 'same' QLinearConv node reading the grids of `_qconv_initializers`."""
    from onnx import helper

    grids = ["x_scale", "x_zero", "w", "w_scale", "w_zero", "y_scale", "y_zero"]
    return helper.make_node("QLinearConv", [source, *grids], [target], pads=[1, 1, 1, 1], group=groups)


def _uint8_input(channels: int, size: int):  # noqa: ANN202 - onnx ValueInfoProto
    """The graph input `x`: uint8, [1, channels, size, size]."""
    from onnx import TensorProto, helper

    return helper.make_tensor_value_info("x", TensorProto.UINT8, [1, channels, size, size])


def _timed(session, x: np.ndarray) -> Callable[[], object]:  # noqa: ANN001
    """A runner for `median_latencies`, after one warm-up run."""
    session.run(None, {"x": x})
    return lambda: session.run(None, {"x": x})


def conv_widths(threads: int, runs: int) -> dict[str, float]:
    """Median ms of one 64 -> M QLinearConv at 1024x1024 for several M."""
    x = np.random.default_rng(1).integers(0, 256, (1, 64, 1024, 1024), dtype=np.uint8)
    runners = {}
    for width in (3, 4, 8, 16):
        session = _session([_qconv("x", "y")], [_uint8_input(64, 1024)], _qconv_initializers(width, 64), threads)
        runners[f"64->{width}"] = _timed(session, x)
    return median_latencies(runners, runs)


def grouped_vs_dense(threads: int, runs: int) -> dict[str, float]:
    """Median ms of two chained 64 -> 64 QLinearConv at 256x256, grouped (4) and dense."""
    x = np.random.default_rng(1).integers(0, 256, (1, 64, 256, 256), dtype=np.uint8)
    runners = {}
    for groups in (4, 1):
        nodes = [_qconv("x", "mid", groups), _qconv("mid", "y", groups)]
        session = _session(nodes, [_uint8_input(64, 256)], _qconv_initializers(64, 64 // groups), threads)
        runners[f"groups={groups}"] = _timed(session, x)
    return median_latencies(runners, runs)


def uint8_upsample(threads: int, runs: int) -> dict[str, float]:
    """Median ms of a uint8 nearest x2 upsampling, Resize against Concat + DepthToSpace; checks they agree."""
    from onnx import helper, numpy_helper

    result = {}
    for size in (256, 512):
        x = np.random.default_rng(1).integers(0, 256, (1, 24, size, size), dtype=np.uint8)
        scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
        resize = _session(
            [helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="nearest")],
            [_uint8_input(24, size)],
            [scales],
            threads,
        )
        shuffle = _session(
            [
                helper.make_node("Concat", ["x"] * 4, ["tiled"], axis=1),
                helper.make_node("DepthToSpace", ["tiled"], ["y"], blocksize=2, mode="DCR"),
            ],
            [_uint8_input(24, size)],
            [],
            threads,
        )
        if not np.array_equal(resize.run(None, {"x": x})[0], shuffle.run(None, {"x": x})[0]):
            raise AssertionError("Concat + DepthToSpace is not a nearest upsampling")
        timings = median_latencies({"resize": _timed(resize, x), "d2s": _timed(shuffle, x)}, runs)
        result |= {f"24x{size}x{size} {key}": value for key, value in timings.items()}
    return result


def _side_by_side(paths: dict[str, Path], threads: int, runs: int) -> dict[str, float]:
    """Median ms of whole graphs on one LR 256x256 input ('all' level), interleaved in a fresh process, as
    bench-speed times them; their outputs must be equal."""
    x = np.random.default_rng(0).random((1, 3, 256, 256), dtype=np.float32)
    outputs = [ort_session(path, threads).run(None, {"lr": x})[0] for path in paths.values()]
    if not all(np.array_equal(outputs[0], out) for out in outputs[1:]):
        raise AssertionError(f"the graphs {list(paths)} compute different outputs")
    return timed_in_fresh_process({key: (path, "all") for key, path in paths.items()}, (256, 256), threads, runs)


def rewrite_on_and_off(name: str, glue: bool, rewrite: str, assets: str, threads: int, runs: int) -> dict[str, float]:
    """Whole integer graph with one export rewrite and without: narrow-conv widening (`widen`), grouped-conv
    densifying (`dense`, compared without the layout rewrites, which split CARN-M's grouped convs instead),
    the layout rewrites (`layout`: grouped convs as branches, channels-last pixel shuffles), the uint8
    grid-conversion tables (`regrid`) or the uint8 concatenations (`concat`, against onnxruntime's
    QLinearConcat)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = api.load_quantized(quantize_w7a8(name, assets, folder, glue), "cpu")
        inexact = not glue  # conv only leaves float glue between the integer kernels: not the deploy recipe
        layout = rewrite in ("widen", "regrid", "concat")  # the layout rewrites on both sides; off for `dense`
        layout_on = layout or rewrite == "layout"
        onnx_export.export_onnx(model, folder / "on.onnx", layout_rewrites=layout_on, allow_inexact=inexact)
        saved = (
            onnx_export._widen_narrow_convs,
            onnx_export.DENSE_MAX_GROUPS,
            onnx_export.requantize_in_uint8,
            onnx_export.concat_in_uint8,
        )
        if rewrite == "widen":
            onnx_export._widen_narrow_convs = lambda graph, calls: []  # the same export without the rewrite
        elif rewrite == "dense":
            onnx_export.DENSE_MAX_GROUPS = 1
        elif rewrite == "regrid":
            onnx_export.requantize_in_uint8 = lambda graph: []
        elif rewrite == "concat":
            onnx_export.concat_in_uint8 = lambda graph: []  # onnxruntime fuses them into QLinearConcat then
        try:
            onnx_export.export_onnx(model, folder / "off.onnx", layout_rewrites=layout, allow_inexact=inexact)
        finally:
            (
                onnx_export._widen_narrow_convs,
                onnx_export.DENSE_MAX_GROUPS,
                onnx_export.requantize_in_uint8,
                onnx_export.concat_in_uint8,
            ) = saved
        timings = _side_by_side({"on": folder / "on.onnx", "off": folder / "off.onnx"}, threads, runs)
        return {f"{rewrite} {key}": value for key, value in timings.items()}


def float_layouts(name: str, assets: str, threads: int, runs: int) -> dict[str, float]:
    """The FP32 graph as exported against the same graph with the layout rewrites (groups of at least 16 or 32
    outputs split), each at onnxruntime's two levels: the candidates for the FP32 baseline."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = api.load_model(name, 4, assets)
        graphs = fp32_graphs(model, folder, None)
        x = np.random.default_rng(0).random((1, 3, 256, 256), dtype=np.float32)
        settings = {f"{kind}:{level}": (path, level) for kind, (path, levels) in graphs.items() for level in levels}
        outputs = [ort_session(path, threads, level).run(None, {"lr": x})[0] for path, level in settings.values()]
        if not all(np.allclose(outputs[0], out, atol=1e-4) for out in outputs[1:]):
            raise AssertionError(f"the FP32 graphs {list(settings)} compute different images")
        return timed_in_fresh_process(settings, (256, 256), threads, runs)


def grouped_as_branches(threads: int, runs: int) -> dict[str, float]:
    """Median ms of one 3x3 QLinearConv 64 -> 256 in 4 groups at 512x512 (CARN-M's second upsampling conv):
    grouped, dense with zero blocks, and as one 16 -> 64 conv per group on a split input, concatenated."""
    from onnx import helper

    x = np.random.default_rng(1).integers(0, 256, (1, 64, 512, 512), dtype=np.uint8)
    inputs = [_uint8_input(64, 512)]
    grouped = _session([_qconv("x", "y", 4)], inputs, _qconv_initializers(256, 16), threads)
    dense = _session([_qconv("x", "y")], inputs, _qconv_initializers(256, 64), threads)
    split = [helper.make_node("Split", ["x"], [f"x{g}" for g in range(4)], axis=1)]
    convs = [_qconv(f"x{g}", f"y{g}") for g in range(4)]  # the same random weights in each branch: timing only
    concat = [helper.make_node("Concat", [f"y{g}" for g in range(4)], ["y"], axis=1)]
    branches = _session(split + convs + concat, inputs, _qconv_initializers(64, 16), threads)
    runners = {"grouped": _timed(grouped, x), "dense": _timed(dense, x), "branches": _timed(branches, x)}
    return median_latencies(runners, runs)


def float_densified(name: str, assets: str, threads: int, runs: int) -> dict[str, float]:
    """The FP32 graph as exported (grouped convs) against the same graph with dense block-diagonal weights."""
    import onnx
    from onnx import numpy_helper

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        onnx_export.export_float_onnx(api.load_model(name, 4, assets), folder / "grouped.onnx")
        graph_model = onnx.load(folder / "grouped.onnx")
        inits = {init.name: init for init in graph_model.graph.initializer}
        done: set[str] = set()
        for node in graph_model.graph.node:
            groups = onnx_export._groups(node) if node.op_type == "Conv" else 1
            if 1 < groups <= onnx_export.DENSE_MAX_GROUPS:
                if node.input[1] not in done:  # a shared unit's weight is read by several nodes
                    dense = onnx_export._dense_codes(numpy_helper.to_array(inits[node.input[1]]), groups)
                    inits[node.input[1]].CopyFrom(numpy_helper.from_array(dense, node.input[1]))
                    done.add(node.input[1])
                onnx_export._set_groups(node, 1)
        onnx.save(graph_model, folder / "dense.onnx")
        paths = {"fp32 grouped": folder / "grouped.onnx", "fp32 dense": folder / "dense.onnx"}
        return _side_by_side(paths, threads, runs)


def table() -> str:
    """The markdown results."""
    data = load_json(OUT)
    produced_by = "python benchmarks/export_microbench.py --assets ../shared/assets --threads 2 --runs 10"
    lines = [header("onnxruntime measurements behind the export rewrites", produced_by), ""]
    for key, cell in data.items():
        lines += [f"## {key}", "", "| setting | ms |", "|---|---|"]
        lines += [f"| {setting} | {ms:.1f} |" for setting, ms in cell.items()]
        lines.append("")
    return "\n".join(lines)


WHOLE_GRAPH_CELLS = {
    "carn-m conv only, whole graph, widening": ("carn-m", False, "widen"),
    "pan + integer glue, whole graph, widening": ("pan", True, "widen"),
    "carn-m + integer glue, whole graph, densifying": ("carn-m", True, "dense"),
    "carn-m + integer glue, whole graph, layout rewrites": ("carn-m", True, "layout"),
    "carn-m + integer glue, whole graph, uint8 regrid tables": ("carn-m", True, "regrid"),
    "carn-m + integer glue, whole graph, uint8 concatenations": ("carn-m", True, "concat"),
}
"""Whole-graph cells: title -> (network, integer glue, rewrite switched off for the comparison)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--only", default=None, help="semicolon-separated cell titles to run (default: all)")
    args = parser.parse_args()
    cells = {
        "QLinearConv 64 -> M at 1024x1024": lambda: conv_widths(args.threads, args.runs),
        "two 64 -> 64 QLinearConv at 256x256": lambda: grouped_vs_dense(args.threads, args.runs),
        "uint8 nearest x2 upsampling": lambda: uint8_upsample(args.threads, args.runs),
        "carn-m FP32 graph, grouped against dense": lambda: float_densified(
            "carn-m", args.assets, args.threads, args.runs
        ),
        "QLinearConv 64 -> 256 in 4 groups at 512x512": lambda: grouped_as_branches(args.threads, args.runs),
        "carn-m FP32 graphs (baseline candidates)": lambda: float_layouts(
            "carn-m", args.assets, args.threads, args.runs
        ),
    }
    for title, (name, glue, rewrite) in WHOLE_GRAPH_CELLS.items():
        cells[title] = lambda n=name, g=glue, r=rewrite: rewrite_on_and_off(
            n, g, r, args.assets, args.threads, args.runs
        )
    chosen = set(args.only.split(";")) if args.only else set(cells)
    for key, measure in cells.items():
        if key not in chosen:
            continue
        cell = measure()
        update_json(OUT, key, cell)
        print(key, {k: round(v, 1) for k, v in cell.items()}, flush=True)
    text = table()
    (RESULTS / "export_microbench.md").write_text(text)
    print(text)


if __name__ == "__main__":
    run_main(main)
