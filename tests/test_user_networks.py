"""The user's own network, defined only in this file: quantize, save, load, eval and export through the CLI
and the API, an inferred layout, and clear errors when the network's file goes missing or changes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import srquant
from srquant import api
from srquant.cli import main
from srquant.errors import SrquantError
from srquant.models.infer_layout import infer_layout

pytestmark = pytest.mark.usefixtures("one_thread")
THIS = Path(__file__).resolve()


class AttentionBlock(nn.Module):
    """conv-relu-conv with a spatial attention gate (max-pool, conv, sigmoid, bilinear upsampling) and a concat."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.gate = nn.Conv2d(channels, channels, 3, padding=1)
        self.merge = nn.Conv2d(2 * channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(F.relu(self.conv1(x)))
        pooled = F.max_pool2d(y, 2, ceil_mode=True)
        attention = torch.sigmoid(self.gate(pooled))
        attention = F.interpolate(attention, size=y.shape[-2:], mode="bilinear", align_corners=False)
        return x + self.merge(torch.cat([y, y * attention], dim=1))


class SpatialAttentionSR(nn.Module):
    """A small SR network of the user's: head, two attention blocks, pixel-shuffle upsampler, global skip."""

    def __init__(self, channels: int = 12, upscale: int = 2) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, channels, 3, padding=1)
        self.blocks = nn.ModuleList([AttentionBlock(channels) for _ in range(2)])
        self.up = nn.Conv2d(channels, 3 * upscale * upscale, 3, padding=1)
        self.shuffle = nn.PixelShuffle(upscale)
        self.upscale = upscale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.head(x)
        out = feat
        for block in self.blocks:
            out = block(out)
        skip = F.interpolate(x, scale_factor=self.upscale, mode="bilinear", align_corners=False)
        return self.shuffle(self.up(out + feat)) + skip


class ByteRangeSR(SpatialAttentionSR):
    """The same network trained on [0, 255] inputs: it expects and returns pixel values."""


def _png(path: Path, height: int, width: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    coarse = np.random.default_rng(seed).integers(0, 256, (height // 4 + 1, width // 4 + 1, 3), dtype=np.uint8)
    Image.fromarray(coarse).resize((width, height), Image.BICUBIC).save(path)


@pytest.fixture
def assets(tmp_path: Path) -> Path:
    """A small asset folder: a two-image Set5 and three training images."""
    root = tmp_path / "assets"
    for i in range(2):
        _png(root / "datasets" / "Set5" / "HR" / f"img{i}.png", 48, 40, i)
    for i in range(3):
        _png(root / "calibration" / "train291" / f"t{i}.png", 128, 128, 10 + i)
    (root / "weights").mkdir()
    return root


@pytest.fixture
def arch(tmp_path: Path) -> tuple[str, Path]:
    """`FILE.py:SpatialAttentionSR` (a copy of this file) and its weights, saved as BasicSR does ({"params": ...})."""
    torch.manual_seed(0)
    source = tmp_path / "my_net.py"
    shutil.copy(THIS, source)
    weights = tmp_path / "my_net.pth"
    torch.save({"params": SpatialAttentionSR(channels=12).state_dict()}, weights)
    return f"{source}:SpatialAttentionSR", weights


SMALL = {"calib_count": 4, "calib_size": 16, "calib_batch": 2}


def test_the_layout_is_inferred_from_the_graph() -> None:
    inferred = infer_layout(_scaled())
    assert inferred.head == ["head"] and inferred.output == ["up"]
    assert "blocks.0.conv2" in inferred.one_sided  # its input comes out of a ReLU
    assert "blocks.0.merge" not in inferred.one_sided  # a concatenation, not an activation
    assert inferred.stages == ["blocks.0", "blocks.1"]
    assert sorted(inferred.body) == sorted(
        f"blocks.{b}.{c}" for b in (0, 1) for c in ("conv1", "conv2", "gate", "merge")
    )


def _scaled() -> nn.Module:
    model = SpatialAttentionSR().eval()
    model.scale = 2
    return model


def test_cli_quantize_eval_export_of_a_user_network(arch, assets: Path, tmp_path: Path, capsys) -> None:
    spec, weights = arch
    common = ["--assets", str(assets), "--device", "cpu"]
    net = ["--arch", spec, "--arch-kwargs", '{"channels": 12}', "--weights", str(weights), "--scale", "2"]
    ckpt = tmp_path / "q.pt"
    argv = ["quantize", *net, "--method", "minmax", "--wbits", "8", "--abits", "8", "--deploy", "onnxruntime"]
    assert main(argv + ["-o", str(ckpt), "--no-progress"] + common) == 0
    printed = capsys.readouterr().out
    assert "layout inferred" in printed and "reads the image" in printed
    report = tmp_path / "r.json"
    assert (
        main(["eval", "--model", str(ckpt), "--scale", "2", "--datasets", "Set5", "--json", str(report)] + common) == 0
    )
    quantized_psnr = json.loads(report.read_text())["results"][0]["psnr"]
    assert main(["eval", *net, "--datasets", "Set5", "--json", str(report)] + common) == 0
    float_psnr = json.loads(report.read_text())["results"][0]["psnr"]
    assert abs(quantized_psnr - float_psnr) < 1.0  # W7A8 of a random network stays close to its float self
    onnx_path = tmp_path / "q.onnx"
    assert main(["export", "--model", str(ckpt), "-o", str(onnx_path), "--assets", str(assets)]) == 0
    import onnxruntime as ort

    model = srquant.load_quantized(ckpt)
    x = torch.rand(1, 3, 20, 18, generator=torch.Generator().manual_seed(3))
    graph = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    out = graph.run(None, {"lr": x.numpy()})[0]
    with torch.no_grad():
        reference = model(x).numpy()
    assert out.shape == reference.shape
    assert np.abs(out - reference).mean() < 2e-3  # the integer graph computes what the fake-quant model does


@pytest.mark.parametrize("bits", [4, 8])
def test_api_quantize_of_a_module_reloads_bit_identically(bits: int, assets: Path, tmp_path: Path) -> None:
    torch.manual_seed(1)
    network = SpatialAttentionSR(channels=12)
    result = srquant.quantize(
        network, 2, "dobi", bits, bits, assets=assets, device="cpu", arch_kwargs={"channels": 12}, **SMALL
    )
    assert result.inferred is not None and result.report.layers
    path = tmp_path / "q.pt"
    result.save(path)
    again = srquant.load_quantized(path)
    x = torch.rand(2, 3, 17, 15, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(result.model(x), again(x))
    scores = srquant.evaluate(again, ["Set5"], 2, assets=assets, progress=False)
    assert np.isfinite(scores[0].psnr)


def test_layers_and_keep_fp_override_the_inferred_layout(assets: Path) -> None:
    result = srquant.quantize(
        SpatialAttentionSR(), 2, "minmax", 4, 4, assets=assets, device="cpu", keep_fp=(r".*\.gate",), **SMALL
    )
    assert not any(name.endswith("gate") for name in result.report.layers)
    only = srquant.quantize(
        SpatialAttentionSR(), 2, "minmax", 4, 4, assets=assets, device="cpu", layers=(r"blocks\.0\..*",), **SMALL
    )
    assert sorted(only.report.layers) == [f"blocks.0.{c}" for c in ("conv1", "conv2", "gate", "merge")]


def test_a_network_trained_on_pixel_values_gets_its_range(tmp_path: Path) -> None:
    torch.manual_seed(2)
    plain = SpatialAttentionSR()
    byte = ByteRangeSR()
    byte.load_state_dict(plain.state_dict())
    adopted = api.float_network(byte, 2, input_range=255)
    x = torch.rand(1, 3, 10, 12)
    with torch.no_grad():
        assert torch.allclose(adopted(x), plain(x * 255) / 255, atol=1e-5)
    assert [n for n, _ in adopted.named_modules()] == [n for n, _ in plain.named_modules()]  # names unchanged


def test_missing_or_changed_architecture_files_are_named(arch, assets: Path, tmp_path: Path, capsys) -> None:
    spec, weights = arch
    source = Path(spec.split(":")[0])
    result = srquant.quantize(
        None, 2, "minmax", 8, 8, assets=assets, device="cpu", arch=spec, arch_kwargs={"channels": 12}, weights=weights
    )
    path = tmp_path / "q.pt"
    result.save(path)
    source.write_text(source.read_text() + "\n# edited\n")
    with pytest.raises(SrquantError, match=f"{source.name} changed since the checkpoint was written"):
        srquant.load_quantized(path)
    source.unlink()
    assert main(["eval", "--model", str(path), "--scale", "2", "--datasets", "Set5", "--assets", str(assets)]) == 2
    assert f"{source} of this checkpoint is missing" in capsys.readouterr().err


def test_bad_user_networks_are_one_line(tmp_path: Path, arch, assets: Path) -> None:
    spec, weights = arch
    with pytest.raises(SrquantError, match="upscales x2, but --scale 4"):
        api.float_network(None, 4, arch=spec)
    with pytest.raises(SrquantError, match="no nn.Module class named 'Nope'"):
        api.float_network(None, 2, arch=f"{spec.split(':')[0]}:Nope")
    with pytest.raises(SrquantError, match="does not fit SpatialAttentionSR: shape mismatch"):
        api.float_network(None, 2, arch=spec, arch_kwargs={"channels": 8}, weights=weights)  # wrong widths
    with pytest.raises(SrquantError, match="FILE.py:ClassName"):
        api.float_network(None, 2, arch="no-colon")
    with pytest.raises(SrquantError, match="unexpected keyword argument"):
        api.float_network(None, 2, arch=spec, arch_kwargs={"width": 8})


def test_a_zoo_network_quantized_with_another_layout_reloads(assets: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    from srquant.models.registry import build_model

    network = build_model("imdn", 2, tiny=True).eval()
    inferred = infer_layout(network)
    result = srquant.quantize(network, 2, "minmax", 8, 8, assets=assets, device="cpu", layout=inferred.layout, **SMALL)
    result.save(tmp_path / "q.pt")
    again = srquant.load_quantized(tmp_path / "q.pt")
    x = torch.rand(1, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(result.model(x), again(x))


def test_a_failed_adoption_leaves_the_module_as_it_was() -> None:
    model = ByteRangeSR()
    with pytest.raises(SrquantError, match="upscales x2"):
        api.float_network(model, 3, input_range=255)
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_a_zoo_checkpoint_reloads_with_its_own_layout_after_the_zoo_layout_changes(
    assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dataclasses

    from srquant.models.layout import PER_CHANNEL
    from srquant.models.registry import REGISTRY, build_model

    torch.manual_seed(0)
    network = build_model("lmlt-tiny", 2, tiny=True).eval()
    result = srquant.quantize(network, 2, "minmax", 4, 4, assets=assets, device="cpu", act_granularity="part", **SMALL)
    result.save(tmp_path / "q.pt")
    entry = REGISTRY["lmlt-tiny"]
    old_layout = dataclasses.replace(entry.layout, input_parts=((r"feats\.\d+\.lhsb\.aggr", 4),))
    assert (r"feats\.\d+\.ccm\.ccm\.2", PER_CHANNEL) in entry.layout.input_parts
    monkeypatch.setitem(REGISTRY, "lmlt-tiny", dataclasses.replace(entry, layout=old_layout))
    again = srquant.load_quantized(tmp_path / "q.pt")
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(result.model(x), again(x))
