"""Layout rewrites of exported graphs: grouped convs as branches, channels-last pixel shuffles; exact results."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from srquant.deploy.layout_rewrites import nhwc_pixel_shuffle, sort_topologically, split_grouped_chains
from srquant.deploy.onnx_export import export_float_onnx, export_onnx
from srquant.deploy.ort_runtime import ort_session
from srquant.methods.ptq import calibrate
from srquant.models.carn import CARNM
from srquant.models.registry import get_entry
from srquant.quant.quantize import quantize_
from srquant.quant.spec import QuantSpec

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def smooth(count: int, size: int, seed: int = 1) -> list[torch.Tensor]:
    """Image-like inputs in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, size // 4, size // 4, generator=g)
    return list(torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear").split(1))


def wide_carn(glue: bool) -> torch.nn.Module:
    """A CARN-M with 32 features in 2 groups (16 and 64 outputs per group: wide enough to branch), quantized
    W7A8 like the deployable recipe and calibrated."""
    torch.manual_seed(0)
    model = CARNM(scale=4, features=32, group=2).eval()
    glue_bits = 8 if glue else None
    spec = QuantSpec(7, 8, full=True, full_w_bits=7, weight_quantizer="symmetric", output_bits=8, glue_bits=glue_bits)
    quantize_(model, spec, get_entry("carn-m").layout)
    calibrate(model, smooth(3, 24), "minmax")
    return model


def run(path: Path, x: np.ndarray, level: str) -> np.ndarray:
    """The graph's output at one onnxruntime optimisation level."""
    return ort_session(path, 1, level).run(None, {"lr": x})[0]


def optimized_op_types(path: Path, tmp_path: Path) -> list[str]:
    """Operator types onnxruntime runs at its 'all' level."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [node.op_type for node in onnx.load(tmp_path / "optimized.onnx").graph.node]


@pytest.mark.parametrize("glue", [False, True])
def test_integer_graph_with_layout_rewrites_is_bit_identical(glue: bool, tmp_path: Path) -> None:
    model = wide_carn(glue)
    report = export_onnx(model, tmp_path / "on.onnx", allow_inexact=not glue)  # float glue: slower, still exact
    export_onnx(model, tmp_path / "off.onnx", layout_rewrites=False, allow_inexact=not glue)
    # The residual units' 3x3 convs (16 outputs per group, called 3 times per block) and both upsampling convs.
    assert report.branched_convs.count("/b1/b1/body/body.0/Conv") == 1
    assert sum("/up4/" in name for name in report.branched_convs) == 2
    assert len(report.nhwc_shuffles) == 4  # two pixel shuffles, in each of the 2 branches
    x = smooth(1, 20, seed=5)[0].numpy()
    for level in ("extended", "all"):
        np.testing.assert_array_equal(run(tmp_path / "on.onnx", x, level), run(tmp_path / "off.onnx", x, level))
    ops = optimized_op_types(tmp_path / "on.onnx", tmp_path)
    assert "DepthToSpace" not in ops
    extra_convs = len(report.branched_convs)  # each branched conv runs as 2 convs (2 groups)
    assert ops.count("QLinearConv") == len(report.convs) + extra_convs
    with torch.no_grad():
        reference = model(torch.from_numpy(x)).numpy()
    assert np.abs(run(tmp_path / "on.onnx", x, "all") - reference).mean() < 5e-4


def test_float_graph_with_layout_rewrites_computes_the_same_image(tmp_path: Path) -> None:
    model = wide_carn(False)
    plain = export_float_onnx(model, tmp_path / "plain.onnx")
    changed = export_float_onnx(model, tmp_path / "wide.onnx", layout_rewrites=True, branch_min_group_outputs=32)
    assert plain == []
    assert [name for name in changed if name.endswith("Conv")] == ["/up4/body/body.0/Conv", "/up4/body/body.3/Conv"]
    x = smooth(1, 16, seed=2)[0].numpy()
    for level in ("extended", "all"):
        np.testing.assert_allclose(
            run(tmp_path / "wide.onnx", x, level), run(tmp_path / "plain.onnx", x, level), atol=1e-5
        )


def shuffle_graph(groups: int, mode: str, shared: bool):  # noqa: ANN201 - onnx ModelProto
    """Conv(groups) -> Relu -> DepthToSpace(2, mode) on float input; with `shared`, a second conv reads the
    same weight (as a module called twice would)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((24, 6 // groups, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(24).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], group=groups, name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("DepthToSpace", ["r"], ["y"], blocksize=2, mode=mode, name="shuffle"),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, "h2", "w2"])]
    if shared:
        nodes.append(helper.make_node("Conv", ["x", "w", "b"], ["z"], pads=[1, 1, 1, 1], group=groups, name="again"))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 24, "h", "w"]))
    graph = helper.make_graph(
        nodes,
        "shuffle",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, "h", "w"])],
        outputs,
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("groups", [1, 2, 3])
def test_channels_last_pixel_shuffle_equals_depth_to_space(groups: int, tmp_path: Path) -> None:
    model = shuffle_graph(groups, "CRD", shared=False)
    onnx.save(model, tmp_path / "plain.onnx")
    assert nhwc_pixel_shuffle(model.graph) == ["shuffle"]
    sort_topologically(model.graph)
    onnx.checker.check_model(model)
    onnx.save(model, tmp_path / "nhwc.onnx")
    assert "DepthToSpace" not in [n.op_type for n in model.graph.node]
    x = np.random.default_rng(1).standard_normal((1, 6, 5, 7)).astype(np.float32)
    for level in ("extended", "all"):
        out = run_any(tmp_path / "nhwc.onnx", x, level)
        assert out.shape == (1, 6, 10, 14)
        np.testing.assert_allclose(out, run_any(tmp_path / "plain.onnx", x, level), atol=1e-5)


def run_any(path: Path, x: np.ndarray, level: str) -> np.ndarray:
    """First output of a graph whose input is `x`."""
    session = ort_session(path, 1, level)
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_shuffles_that_cannot_be_rewritten_are_left_alone() -> None:
    dcr = shuffle_graph(1, "DCR", shared=False)
    assert nhwc_pixel_shuffle(dcr.graph) == []  # DCR order does not keep a conv's channel blocks together
    shared = shuffle_graph(1, "CRD", shared=True)
    assert nhwc_pixel_shuffle(shared.graph) == []  # reordering a shared weight would change the other conv
    assert [n.op_type for n in shared.graph.node].count("DepthToSpace") == 1


def test_narrow_groups_are_not_split() -> None:
    model = shuffle_graph(2, "CRD", shared=False)  # 12 outputs per group
    assert split_grouped_chains(model.graph, 16) == []
    assert split_grouped_chains(model.graph, 12) == ["conv"]
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Conv") == 2 and "Split" in ops and "Concat" in ops


@pytest.mark.parametrize("name", ["imdn", "eswt"])
def test_pixel_shuffle_of_the_output_conv_is_rewritten_exactly(name: str, tmp_path: Path) -> None:
    from srquant.models.registry import build_model

    torch.manual_seed(0)
    model = build_model(name, 4, tiny=True).eval()
    spec = QuantSpec(7, 8, full=True, full_w_bits=7, weight_quantizer="symmetric", output_bits=8, matmul=False)
    quantize_(model, spec, get_entry(name).layout)
    calibrate(model, smooth(3, 16), "minmax")
    report = export_onnx(model, tmp_path / "on.onnx", size=(16, 16), allow_inexact=True)  # float glue: still exact
    export_onnx(model, tmp_path / "off.onnx", size=(16, 16), layout_rewrites=False, allow_inexact=True)
    assert len(report.nhwc_shuffles) == 1  # the upsampler's pixel shuffle
    x = smooth(1, 16, seed=3)[0].numpy()
    for level in ("extended", "all"):
        np.testing.assert_array_equal(run(tmp_path / "on.onnx", x, level), run(tmp_path / "off.onnx", x, level))
