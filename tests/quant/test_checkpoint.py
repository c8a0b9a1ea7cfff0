"""Quantized checkpoints: packing, bit-identical reload, size, and refusing the wrong kind of file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from srquant.errors import SrquantError
from srquant.methods.ptq import calibrate
from srquant.models.registry import REGISTRY, build_model, create_model
from srquant.quant.checkpoint import load_quantized, pack_codes, save_quantized, unpack_codes
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
    ],
)
def test_save_load_is_bit_identical(tmp_path: Path, name: str, spec: QuantSpec) -> None:
    torch.manual_seed(0)
    model = build_model(name, 4, tiny=True).eval()
    quantize_(model, spec, REGISTRY[name].layout)
    x = torch.rand(2, 3, 12, 10)
    calibrate(model, [x], "dobi")
    path = tmp_path / "q.pt"
    save_quantized(model, path, name, spec, {"method": "dobi"})
    # The tiny variant is registered under the same name: rebuild with its kwargs for the comparison.
    entry = REGISTRY[name]
    REGISTRY[name] = entry.__class__(**{**entry.__dict__, "kwargs": entry.tiny_kwargs})
    try:
        again, record = load_quantized(path)
    finally:
        REGISTRY[name] = entry
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    assert record["meta"] == {"method": "dobi"}


def test_4bit_file_is_about_an_eighth_for_quantized_layers(tmp_path: Path) -> None:
    model = build_model("edsr-baseline", 4).eval()  # 1.52 M parameters, 32 body convs quantized
    spec = QuantSpec(4, 4)
    quantize_(model, spec, REGISTRY["edsr-baseline"].layout)
    calibrate(model, [torch.rand(1, 3, 8, 8)], "minmax")
    float_path, quant_path = tmp_path / "f.pth", tmp_path / "q.pt"
    torch.save(build_model("edsr-baseline", 4).state_dict(), float_path)
    size_q = save_quantized(model, quant_path, "edsr-baseline", spec, {})
    body = sum(m.weight.numel() for _, m in model.named_modules() if is_quantized(m))
    expected = float_path.stat().st_size - body * 4 + body * 0.5
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
    save_quantized(model, quant_path, "pan", QuantSpec(4, 4), {})
    with pytest.raises(SrquantError, match="quantized checkpoint, not float weights"):
        create_model("pan", 4, tiny=True, weights=quant_path)
