"""Quantized checkpoints: packing, bit-identical reload, size, and refusing the wrong kind of file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from srquant.errors import SrquantError
from srquant.methods.pipeline import load_checkpoint, load_quantized, save_quantized
from srquant.methods.ptq import calibrate
from srquant.models.registry import REGISTRY, build_model, create_model
from srquant.quant.checkpoint import pack_codes, unpack_codes
from srquant.quant.modules import is_quantized
from srquant.quant.quantize import quantize_
from srquant.quant.spec import QuantSpec


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_pack_round_trip(bits: int) -> None:
    codes = torch.randint(0, 2**bits, (1001,))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-1001 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, 1001), codes)


@pytest.mark.parametrize(
    ("name", "spec"),
    [
        ("imdn", QuantSpec(4, 4)),
        ("swinir-light", QuantSpec(3, 3)),
        ("eswt", QuantSpec(2, 4)),
        ("carn-m", QuantSpec(4, 4, full=True)),
        ("pan", QuantSpec(8, 8, full=True, output_bits=8, glue_bits=8)),
        ("edsr-baseline", QuantSpec(4, 4, weight_quantizer="symmetric")),
        ("srresnet", QuantSpec(4, 8, weight_quantizer="lsq", act_quantizer="lsq")),
        ("imdn", QuantSpec(3, 4, weight_granularity="tensor")),
        ("lmlt-tiny", QuantSpec(4, 4, weight_quantizer="symmetric", weight_granularity="tensor")),
        ("carn-m", QuantSpec(3, 3, act_granularity="part")),
        ("eswt", QuantSpec(4, 4, act_granularity="part")),
    ],
)
def test_save_load_is_bit_identical(tmp_path: Path, name: str, spec: QuantSpec) -> None:
    torch.manual_seed(0)
    model = build_model(name, 4, tiny=True).eval()
    quantize_(model, spec, REGISTRY[name].layout)
    x = torch.rand(2, 3, 12, 10)
    calibrate(model, [x], "dobi")
    path = tmp_path / "q.pt"
    save_quantized(model, path, "dobi", spec, {"note": "tiny"})
    loaded = load_checkpoint(path)  # the tiny variant's kwargs travel in the architecture record
    with torch.no_grad():
        assert torch.equal(model(x), loaded.model(x))
    assert loaded.record["meta"] == {"note": "tiny"} and loaded.method == "dobi"
    assert not list(tmp_path.glob("*.tmp"))  # written atomically


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_4bit_file_is_about_an_eighth_for_quantized_layers(tmp_path: Path, granularity: str) -> None:
    model = build_model("edsr-baseline", 4).eval()  # 1.52 M parameters, 32 body convs quantized
    spec = QuantSpec(4, 4, weight_granularity=granularity)
    quantize_(model, spec, REGISTRY["edsr-baseline"].layout)
    calibrate(model, [torch.rand(1, 3, 8, 8)], "minmax")
    float_path, quant_path = tmp_path / "f.pth", tmp_path / "q.pt"
    torch.save(build_model("edsr-baseline", 4).state_dict(), float_path)
    size_q = save_quantized(model, quant_path, "minmax", spec, {})
    body = sum(m.weight.numel() for _, m in model.named_modules() if is_quantized(m))
    ranges = sum(
        p.numel() for _, m in model.named_modules() if is_quantized(m) for p in m.weight_quantizer.parameters()
    )
    expected = float_path.stat().st_size - body * 4 + body * 0.5 + ranges * 4  # per-channel ranges are float32
    assert abs(size_q - expected) / expected < 0.02


def test_wrong_kind_of_checkpoint_is_refused(tmp_path: Path) -> None:
    float_path = tmp_path / "float.pth"
    torch.save(build_model("pan", 4, tiny=True).state_dict(), float_path)
    with pytest.raises(SrquantError, match="is a float checkpoint"):
        load_quantized(float_path)
    model = build_model("pan", 4, tiny=True).eval()
    quantize_(model, QuantSpec(4, 4), REGISTRY["pan"].layout)
    calibrate(model, [torch.rand(1, 3, 8, 8)], "minmax")
    quant_path = tmp_path / "q.pt"
    save_quantized(model, quant_path, "minmax", QuantSpec(4, 4), {})
    with pytest.raises(SrquantError, match="quantized checkpoint, not float weights"):
        create_model("pan", 4, tiny=True, weights=quant_path)


def test_a_checkpoint_of_the_previous_format_says_how_to_redo_it(tmp_path: Path) -> None:
    old = {
        "format": "srquant-quantized/1",
        "model": "imdn",
        "scale": 4,
        "spec": {"w_bits": 4, "a_bits": 4},
        "meta": {"method": "2dquant"},
    }
    torch.save(old, tmp_path / "old.pt")
    redo = "earlier srquant .*srquant quantize --model imdn --scale 4 --method 2dquant"
    with pytest.raises(SrquantError, match=redo):
        load_quantized(tmp_path / "old.pt")
