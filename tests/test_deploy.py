"""Integer ONNX export: the graph runs integer kernels, matches the fake-quant model, opens without srquant."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import HAVE_ASSETS, SKIP_REASON

from srquant.deploy.onnx_export import conv_params, export_float_onnx, export_gaps, export_onnx
from srquant.deploy.ort_runtime import ort_session
from srquant.deploy.speed import bench_onnxruntime, median_latencies, parse_size
from srquant.errors import SrquantError
from srquant.methods.ptq import calibrate
from srquant.models.registry import build_model, get_entry
from srquant.quant.quantize import quantize_
from srquant.quant.spec import QuantSpec

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def smooth_batches(count: int = 3, size: int = 24) -> list[torch.Tensor]:
    """Image-like inputs (smooth, in [0, 1]) so calibrated ranges cover the test input."""
    g = torch.Generator().manual_seed(1)
    coarse = torch.rand(count, 3, size // 4, size // 4, generator=g)
    return list(torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear").clamp(0, 1).split(1))


def quantized_tiny(name: str = "imdn", **spec: object) -> torch.nn.Module:
    """A tiny zoo network quantized W7A8 (fully, symmetric per-channel weights whose codes stay within +-63, which
    int8 kernels add without saturating on every CPU; simulated outputs) and calibrated."""
    torch.manual_seed(0)
    model = build_model(name, 4, tiny=True).eval()
    options: dict[str, object] = {"full": True, "weight_quantizer": "symmetric", "output_bits": 8, "matmul": False}
    options["full_w_bits"] = spec.get("w_bits", 7)
    options.update(spec)
    quantize_(model, QuantSpec(options.pop("w_bits", 7), options.pop("a_bits", 8), **options), get_entry(name).layout)  # type: ignore[arg-type]
    calibrate(model, smooth_batches(), "minmax")
    return model


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_integer_graph_runs_qlinearconv_and_matches_the_fake_quant_model(tmp_path: Path, granularity: str) -> None:
    model = quantized_tiny(weight_granularity=granularity)
    report = export_onnx(model, tmp_path / "q.onnx", allow_inexact=True)  # exact; only the glue stays float
    assert len(report.simulated_outputs) == len(report.convs) == len(conv_params(model))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(str(tmp_path / "q.onnx"), options, providers=["CPUExecutionProvider"])
    x = smooth_batches(1, 20)[0]
    out = session.run(None, {"lr": x.numpy()})[0]
    ops = [node.op_type for node in onnx.load(tmp_path / "optimized.onnx").graph.node]
    assert ops.count("QLinearConv") == len(report.convs)  # every quantized conv runs on the integer kernel
    with torch.no_grad():
        reference = model(x).numpy()
    assert out.shape == reference.shape
    # The same grids (zero points aligned): only rare one-step flips from float accumulation order remain.
    diff = np.abs(out - reference)
    assert (diff > 1e-4).mean() < 0.05
    assert diff.mean() < 5e-4 and diff.max() < 0.02


def optimized_nodes(path: Path, tmp_path: Path) -> list:
    """The nodes of the graph onnxruntime actually runs (after its QDQ fusions)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return list(onnx.load(tmp_path / "optimized.onnx").graph.node)


def optimized_ops(path: Path, tmp_path: Path) -> list[str]:
    """Operator types of the graph onnxruntime actually runs."""
    return [node.op_type for node in optimized_nodes(path, tmp_path)]


def test_dequantize_moves_past_relu_and_depth_to_space_without_changing_the_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = quantized_tiny("carn-m")
    report = export_onnx(model, tmp_path / "sunk.onnx", layout_rewrites=False, allow_inexact=True)  # keeps D2S ops
    graph = onnx.load(tmp_path / "sunk.onnx").graph
    moved = [node for node in graph.node if node.name in report.sunk_dequantize]
    assert {node.op_type for node in moved} == {"Max", "DepthToSpace"}  # ReLU became max(q, zero point)
    for node in moved:  # each now reads a uint8 tensor and feeds a DequantizeLinear (or a uint8 regrid table)
        readers = {n.op_type for n in graph.node if node.output[0] in n.input}
        assert readers and readers <= {"DequantizeLinear", "Max", "DepthToSpace", "QLinearLeakyRelu"}
    monkeypatch.setattr("srquant.deploy.onnx_export.sink_dequantize", lambda graph: [])
    export_onnx(model, tmp_path / "plain.onnx", layout_rewrites=False, allow_inexact=True)
    x = smooth_batches(1, 20)[0].numpy()
    sunk = ort_session(tmp_path / "sunk.onnx", 1).run(None, {"lr": x})[0]
    plain = ort_session(tmp_path / "plain.onnx", 1).run(None, {"lr": x})[0]
    np.testing.assert_array_equal(sunk, plain)  # exact: a permutation and a max on the grid


GLUE_KERNELS = {  # concatenations run as uint8 tables + uint8 Concat (`uint8_concats`), not QLinearConcat
    "imdn": {"QLinearLeakyRelu", "QLinearMul", "QLinearAdd"},
    "pan": {"QLinearLeakyRelu", "QLinearMul", "QLinearAdd", "QLinearSigmoid"},
    "carn-m": {"QLinearAdd"},
}


@pytest.mark.parametrize("name", sorted(GLUE_KERNELS))
def test_quantized_glue_runs_on_uint8_kernels_and_matches_the_fake_quant_model(name: str, tmp_path: Path) -> None:
    model = quantized_tiny(name, glue_bits=8)
    # Without the layout rewrites, whose uint8 branch concatenations and shape arithmetic would blur the check.
    report = export_onnx(model, tmp_path / "glue.onnx", layout_rewrites=False)
    marked = sorted(n for n, _ in model.named_modules(remove_duplicate=False) if n.endswith("_glue"))
    assert marked and report.glue == marked
    nodes = optimized_nodes(tmp_path / "glue.onnx", tmp_path)
    ops = [node.op_type for node in nodes]
    assert ops.count("QLinearConv") == len(report.convs)
    # The activations, concatenations, gates and sums between the convs no longer run in float.
    assert not {"LeakyRelu", "Sigmoid", "Mul", "QLinearConcat"} & set(ops)
    concats = [node.name for node in nodes if node.op_type == "Concat"]
    assert report.uint8_concats and concats == [f"{name}_uint8" for name in report.uint8_concats]
    assert GLUE_KERNELS[name] <= set(ops)
    if name == "imdn":  # the distillation splits run on uint8 (their DequantizeLinear moved past them) ...
        assert any(op.endswith("Split") for op in report.sunk_dequantize)
        # ... and the convs reading a split share its grid: no requantization between them.
        assert model.get_submodule("IMDB1.c2").input_quantizer is model.get_submodule("IMDB1.act1_glue")
        assert ops.count("DequantizeLinear") < ops.count("QLinearConv") // 2
    x = smooth_batches(1, 20)[0]
    out = ort_session(tmp_path / "glue.onnx", 1).run(None, {"lr": x.numpy()})[0]
    with torch.no_grad():
        reference = model(x).numpy()
    diff = np.abs(out - reference)
    assert (diff > 1e-4).mean() < 0.05
    assert diff.mean() < 5e-4 and diff.max() < 0.03
    export_onnx(model, tmp_path / "again.onnx")  # the glue quantizers were swapped out for the trace only
    with torch.no_grad():
        assert np.array_equal(model(x).numpy(), reference)


def test_narrow_convs_run_widened_with_the_same_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = quantized_tiny("pan", glue_bits=8)  # 8 features: every conv is narrower than 16 outputs
    report = export_onnx(model, tmp_path / "wide.onnx")
    assert "conv_last" in report.widened_convs
    graph = onnx.load(tmp_path / "wide.onnx").graph
    weights = {init.name: init for init in graph.initializer}
    assert list(weights["conv_last_w_int"].dims)[0] == 16  # 3 image channels + 13 zero channels
    assert optimized_ops(tmp_path / "wide.onnx", tmp_path).count("QLinearConv") == len(report.convs)
    monkeypatch.setattr("srquant.deploy.onnx_export._widen_narrow_convs", lambda graph, names: [])
    export_onnx(model, tmp_path / "narrow.onnx")
    x = smooth_batches(1, 20)[0].numpy()
    wide = ort_session(tmp_path / "wide.onnx", 1).run(None, {"lr": x})[0]
    narrow = ort_session(tmp_path / "narrow.onnx", 1).run(None, {"lr": x})[0]
    assert wide.shape == narrow.shape == (1, 3, 80, 80)
    np.testing.assert_array_equal(wide, narrow)  # zero weights add nothing; the slice drops them again


def test_a_module_called_several_times_runs_on_the_integer_kernel_at_every_call(tmp_path: Path) -> None:
    model = quantized_tiny("carn-m")  # each cascading block calls its one residual unit three times
    report = export_onnx(model, tmp_path / "q.onnx", allow_inexact=True)  # exact; only the glue stays float
    assert report.convs.count("b1.b1.body.0") == 3
    ops = optimized_ops(tmp_path / "q.onnx", tmp_path)
    assert ops.count("QLinearConv") == len(report.convs)
    assert ops.count("Conv") + ops.count("FusedConv") == 2  # only the never-quantized mean shifts stay float
    x = smooth_batches(1, 20)[0]
    out = ort_session(tmp_path / "q.onnx", 1).run(None, {"lr": x.numpy()})[0]
    with torch.no_grad():
        reference = model(x).numpy()
    assert np.abs(out - reference).mean() < 5e-4


def test_grouped_convs_run_dense_with_the_same_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = quantized_tiny("carn-m", glue_bits=8)  # its residual units and upsamplers use groups=4
    export_onnx(model, tmp_path / "dense.onnx")
    graph = onnx.load(tmp_path / "dense.onnx").graph
    weights = {init.name: init for init in graph.initializer}
    assert list(weights["b1_b1_body_0_w_int"].dims)[1] == 8  # all 8 input channels: was 2 per group in 4 groups
    assert all(a.i == 1 for n in graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "group")
    monkeypatch.setattr("srquant.deploy.onnx_export.DENSE_MAX_GROUPS", 1)
    export_onnx(model, tmp_path / "grouped.onnx")
    x = smooth_batches(1, 20)[0].numpy()
    dense = ort_session(tmp_path / "dense.onnx", 1).run(None, {"lr": x})[0]
    grouped = ort_session(tmp_path / "grouped.onnx", 1).run(None, {"lr": x})[0]
    np.testing.assert_array_equal(dense, grouped)  # the zero blocks add nothing


def test_grid_conversions_run_as_uint8_tables_with_the_same_codes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = quantized_tiny("carn-m", glue_bits=8)  # the shared residual unit reads three tensors on one grid
    report = export_onnx(model, tmp_path / "table.onnx")
    assert report.uint8_requantize  # the conversions onto that grid
    tables = [n.name for n in optimized_nodes(tmp_path / "table.onnx", tmp_path) if n.op_type == "QLinearLeakyRelu"]
    assert sorted(t for t in tables if t.endswith("_requantize")) == sorted(
        f"{q}_requantize" for q in report.uint8_requantize
    )
    monkeypatch.setattr("srquant.deploy.onnx_export.requantize_in_uint8", lambda graph: [])
    export_onnx(model, tmp_path / "float.onnx")
    x = smooth_batches(1, 20)[0].numpy()
    table = ort_session(tmp_path / "table.onnx", 1).run(None, {"lr": x})[0]
    plain = ort_session(tmp_path / "float.onnx", 1).run(None, {"lr": x})[0]
    np.testing.assert_array_equal(table, plain)


@pytest.mark.parametrize("name", ["imdn", "carn-m"])
def test_concatenations_run_as_uint8_tables_and_a_copy_with_the_same_output(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = quantized_tiny(name, glue_bits=8)
    report = export_onnx(model, tmp_path / "tables.onnx")
    assert report.uint8_concats
    assert "QLinearConcat" not in optimized_ops(tmp_path / "tables.onnx", tmp_path)
    monkeypatch.setattr("srquant.deploy.onnx_export.concat_in_uint8", lambda graph: [])
    export_onnx(model, tmp_path / "fused.onnx")
    assert "QLinearConcat" in optimized_ops(tmp_path / "fused.onnx", tmp_path)  # onnxruntime's own fusion
    x = smooth_batches(1, 20)[0].numpy()
    for level in ("basic", "all"):
        tables = ort_session(tmp_path / "tables.onnx", 1, level).run(None, {"lr": x})[0]
        fused = ort_session(tmp_path / "fused.onnx", 1, level).run(None, {"lr": x})[0]
        np.testing.assert_array_equal(tables, fused)


def test_uint8_table_equals_dequantize_then_quantize_on_every_code() -> None:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    codes = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16)
    io = [helper.make_tensor_value_info(n, TensorProto.UINT8, [1, 1, 16, 16]) for n in ("x", "y")]
    for trial in range(40):
        source = float(rng.uniform(1e-4, 0.1))
        target = source * float(rng.choice([0.25, 0.5, 2.0])) if trial % 2 else float(rng.uniform(1e-4, 0.1))
        grids = {"s": source, "t": target}
        zeros = {"zs": int(rng.integers(0, 256)), "zt": int(rng.integers(0, 256))}
        inits = [numpy_helper.from_array(np.array(v, np.float32), k) for k, v in grids.items()]
        inits += [numpy_helper.from_array(np.array(v, np.uint8), k) for k, v in zeros.items()]
        pair = [
            helper.make_node("DequantizeLinear", ["x", "s", "zs"], ["f"]),
            helper.make_node("QuantizeLinear", ["f", "t", "zt"], ["y"]),
        ]
        table = [
            helper.make_node("QLinearLeakyRelu", ["x", "s", "zs", "t", "zt"], ["y"], domain="com.microsoft", alpha=1.0)
        ]
        outputs = []
        for nodes in (pair, table):
            graph = helper.make_graph(nodes, "regrid", io[:1], io[1:], inits)
            model = helper.make_model(
                graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
            )
            session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            outputs.append(session.run(None, {"x": codes})[0])
        np.testing.assert_array_equal(*outputs)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB between two images in [0, 1]."""
    return float(10 * np.log10(1.0 / np.mean((a - b) ** 2)))


@pytest.mark.parametrize(("name", "linears", "matmuls"), [("lmlt-tiny", 16, 16), ("eswt", 0, 8)])
def test_linear_layers_and_attention_matmuls_run_on_integer_kernels(
    name: str, linears: int, matmuls: int, tmp_path: Path
) -> None:
    model = quantized_tiny(name, matmul=True)  # query, key, value and softmax map quantized too
    report = export_onnx(model, tmp_path / "q.onnx", size=(16, 16))
    hooks = [n for n in report.glue if n.rpartition(".")[2] in ("q_hook", "k_hook", "v_hook", "attn_hook")]
    assert len(hooks) == 2 * matmuls  # both operands of every attention matmul
    ops = optimized_ops(tmp_path / "q.onnx", tmp_path)
    assert ops.count("QGemm") == linears  # LMLT's token-wise linear layers (qkv and proj of each window attention)
    assert ops.count("MatMulIntegerToFloat") == matmuls  # q @ k^T and softmax @ v on uint8 operands
    assert ops.count("QLinearConv") + ops.count("QGemm") == len(report.convs)
    x = smooth_batches(1, 16)[0]
    out = ort_session(tmp_path / "q.onnx", 1).run(None, {"lr": x.numpy()})[0]
    from srquant.quant.quantize import fp_mode

    with torch.no_grad():
        fake = model(x).numpy()
        with fp_mode(model):
            float_out = model(x).numpy()
    # The integer graph departs from the fake-quant model far less than quantization departs from float.
    assert psnr(out, fake) > psnr(fake, float_out) + 5


def test_float_graph_equals_the_float_network(tmp_path: Path) -> None:
    model = quantized_tiny(glue_bits=8)
    export_float_onnx(model, tmp_path / "f.onnx")
    x = smooth_batches(1, 16)[0]
    out = ort_session(tmp_path / "f.onnx", 1).run(None, {"lr": x.numpy()})[0]
    from srquant.quant.quantize import fp_mode

    with torch.no_grad(), fp_mode(model):
        reference = model(x).numpy()
    np.testing.assert_allclose(out, reference, atol=1e-4)


def test_exported_graph_opens_in_a_fresh_process_without_srquant(tmp_path: Path) -> None:
    model = quantized_tiny(glue_bits=8)
    export_onnx(model, tmp_path / "q.onnx")
    script = (
        "import sys, numpy as np, onnxruntime as ort\n"
        f"s = ort.InferenceSession({str(tmp_path / 'q.onnx')!r}, providers=['CPUExecutionProvider'])\n"
        "y = s.run(None, {'lr': np.random.default_rng(0).random((1, 3, 12, 14), dtype=np.float32)})[0]\n"
        "assert 'srquant' not in sys.modules and 'torch' not in sys.modules\n"
        "print(list(y.shape))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip()) == [1, 3, 48, 56]  # x4, any size (dynamic axes)


def test_low_bit_symmetric_weights_map_exactly_and_asymmetric_ones_are_regridded() -> None:
    exact = conv_params(quantized_tiny(w_bits=4))
    assert all(p.weight_exact for p in exact.values())
    body = [p for name, p in exact.items() if name.startswith("IMDB")]
    assert body and all(np.abs(p.weight_codes).max() <= 7 for p in body)  # 4-bit values in int8 storage
    regridded = conv_params(quantized_tiny(weight_quantizer="asymmetric"))
    assert not all(p.weight_exact for p in regridded.values())


def test_export_refuses_what_has_no_static_integer_graph(tmp_path: Path) -> None:
    with pytest.raises(SrquantError, match="export needs A8"):
        export_onnx(quantized_tiny(a_bits=4), tmp_path / "a4.onnx")
    model = quantized_tiny()
    first = next(m for m in model.modules() if hasattr(m, "input_quantizer"))
    first.input_quantizer.bits_override = torch.tensor([6])
    with pytest.raises(SrquantError, match="dynamic per-image bits"):
        export_onnx(model, tmp_path / "dynamic.onnx")


def test_unsimulated_outputs_need_calibration_images(tmp_path: Path) -> None:
    model = quantized_tiny(output_bits=None)
    with pytest.raises(SrquantError, match="outputs are not simulated .use --output-bits 8"):
        export_onnx(model, tmp_path / "q.onnx")
    with pytest.raises(SrquantError, match="no simulated output quantizer"):
        export_onnx(model, tmp_path / "q.onnx", allow_inexact=True)
    report = export_onnx(model, tmp_path / "q.onnx", smooth_batches(), allow_inexact=True)
    assert report.calibrated_outputs and not report.simulated_outputs


def test_export_names_what_would_make_the_graph_inexact_or_slow(tmp_path: Path) -> None:
    ready = quantized_tiny(glue_bits=8)
    assert export_gaps(ready) == []  # W7 symmetric weights, simulated outputs, quantized glue
    gaps = export_gaps(quantized_tiny(w_bits=8))
    assert any("beyond +-64" in gap for gap in gaps)  # 8-bit codes: int16 pair sums of u8 x s8 kernels saturate
    assert any("--glue-bits 8" in gap for gap in gaps)
    assert any("asymmetric weights" in gap for gap in export_gaps(quantized_tiny(weight_quantizer="asymmetric")))
    with pytest.raises(SrquantError, match="would export inexact or slow: .*beyond \\+-64"):
        export_onnx(quantized_tiny(w_bits=8, glue_bits=8), tmp_path / "w8.onnx")


def test_padding_networks_export_for_one_size(tmp_path: Path) -> None:
    model = quantized_tiny("eswt")
    with pytest.raises(SrquantError, match="give the LR size"):
        export_onnx(model, tmp_path / "e.onnx")
    report = export_onnx(model, tmp_path / "e.onnx", size=(20, 24))
    assert not report.dynamic_axes
    out = ort_session(tmp_path / "e.onnx", 1).run(None, {"lr": smooth_batches(1, 24)[0][..., :20, :].numpy()})[0]
    assert out.shape == (1, 3, 80, 96)


def test_speed_report_has_the_documented_keys(tmp_path: Path) -> None:
    model = quantized_tiny()
    result = bench_onnxruntime(model, (16, 16), threads=1, runs=1, calib_inputs=None, psnr=None, allow_inexact=True)
    record = result.to_json()
    for key in ("backend", "fp32_ms", "int_ms", "speedup", "psnr_delta_db", "peak_mb"):
        assert key in record
    assert record["backend"] == "onnxruntime" and record["size"] == "16x16"
    assert result.speedup == pytest.approx(result.fp32_ms / result.int_ms)
    assert result.fp32_setting.split(":")[0] in ("fp32", "fp32-layout16", "fp32-layout32")
    assert result.int_setting.startswith("int:")
    assert result.export["uint8_ops"] == ["/upsampler/upsampler.1/DepthToSpace"]  # the pixel shuffle, on uint8
    assert result.peak_mb > 10  # a real process's resident peak, not the parent's


def test_latencies_are_interleaved_and_parse_size_checks_input() -> None:
    calls: list[str] = []
    medians = median_latencies({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, runs=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "a", "b", "a", "b"]
    assert set(medians) == {"a", "b"}
    assert parse_size("256x128") == (256, 128)
    with pytest.raises(SrquantError, match="256x256"):
        parse_size("256")


@pytest.mark.skipif(not HAVE_ASSETS, reason=SKIP_REASON)
def test_cli_export_and_bench_speed_on_a_real_network(tmp_path: Path, assets: Path) -> None:
    from srquant.cli import main

    ckpt, onnx_path, record = tmp_path / "imdn.pt", tmp_path / "imdn.onnx", tmp_path / "speed.json"
    common = ["--assets", str(assets)]
    args = ["quantize", "--model", "imdn", "--scale", "4", "--method", "minmax", "--wbits", "8", "--abits", "8"]
    args += ["--deploy", "onnxruntime", "-o", str(ckpt), "--no-progress", "--device", "cpu"]
    assert main(args + common) == 0
    assert main(["export", "--model", str(ckpt), "-o", str(onnx_path)] + common) == 0
    assert onnx_path.stat().st_size > 0
    bench = ["bench-speed", "--model", str(ckpt), "--size", "24x24", "--runs", "1", "--threads", "1"]
    assert main(bench + ["--psnr-dataset", "Set5", "--json", str(record)] + common) == 0
    result = json.loads(record.read_text())
    assert abs(result["psnr_delta_db"]) < 0.05  # the integer graph computes what the fake-quant model computes
