"""Tests for ops and storage accounting, including the reproduction of 2DQuant's Tables 1-2 for SwinIR-light x4.

What the 2DQuant figures are, found by computing (see ``Kai-Liu001/2DQuant`` ``basicsr/archs/swinir_arch.py``
``__main__`` and ``flops_all``):

* "Ops (G)" / "FLOPs" are MAC counts from SwinIR's hand-written ``flops()`` formulas evaluated on a
  **128x128 LR token grid** (img_size = 512 // 4 = 128, i.e. a 512x512 output), not on a 1280x720 output.
  Those formulas count Linear and both attention matmuls exactly (our measured Linear+BMM MACs equal the
  paper's 14.34 G to the last MAC), but mis-count three things: ``conv_after_body`` as ``3 * C * C`` per
  pixel instead of ``9 * C * C`` (1/3 of its MACs), the upsampler conv as ``C * 3 * 9`` instead of
  ``C * 3 * s**2 * 9`` (1/16 at x4, and filed under "other"), and "other" as one op per LayerNorm element
  (the final ``norm`` omitted) with no softmax, GELU, residual adds or attention bias. Applying exactly
  these deviations to our measured rows reproduces 14.34 / 2.33 / 0.07 / 4.19 G to the last digit; the
  total is 16.746 G, printed as 16.74 in the paper, which is the sum of the three rounded parts.
* Params are ``numel * 4`` bytes **without the relative_position_bias_table** (897,228 parameters; the
  2DQuant script skips the tables explicitly): 3,588,912 B = **3.42 MiB** (3.59 MB). The 4-bit size keeps
  biases and every non-Linear parameter at 32 bit: 1,169,712 B = **1.17 MB** (decimal; 1.12 MiB). So the
  table mixes binary and decimal megabytes.
* SwinIR's own 49.6 G Mult-Adds for x4-light is the same formula on its test script's 264x184 padded grid
  (a 1024x720 output, not 1280x720).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from srquant.errors import SrquantError
from srquant.metrics.complexity import (
    CONV,
    GIGA,
    LINEAR,
    MATMUL,
    OTHER,
    SWINIR_PAPER_EXCLUDES,
    OpsReport,
    bitops,
    count_ops,
    lr_size_for_output,
    ops_at_bits,
    param_bytes,
    param_count,
    to_giga,
    to_mb,
    to_mib,
)
from srquant.models.registry import build_model


def g2(value: float) -> float:
    """A MAC count in G rounded to two decimals, as the paper's tables print it."""
    return round(to_giga(value), 2)


# --- hand-checkable counts ---------------------------------------------------------------------------------


def test_single_conv_matches_hand_count() -> None:
    """One 3x3 conv: H * W * Cin * Cout * 9 MACs, params weight + bias, nothing else."""
    model = nn.Conv2d(3, 8, 3, padding=1)
    report = count_ops(model, (5, 7))
    assert report.rows[0].name == "" and report.rows[0].kind == CONV
    assert report.total_macs == 5 * 7 * 3 * 8 * 9 == 7560
    assert report.rows[0].params == 8 * 3 * 9 + 8
    assert report.total_flops == 2 * 7560 and report.out_size == (5, 7)


class TinyNet(nn.Module):
    """Conv, grouped conv, ReLU, pixel shuffle and a per-pixel Linear: every counting rule at once."""

    def __init__(self) -> None:
        """Build the layers."""
        super().__init__()
        self.head = nn.Conv2d(3, 4, 3, padding=1)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 12)
        self.shuffle = nn.PixelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the layers; the Linear acts on each pixel's channel vector."""
        y = self.act(self.dw(self.head(x)))
        y = self.fc(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.shuffle(y)


def test_tiny_net_rows_match_hand_count() -> None:
    """Each rule gives the hand count: groups divide Cin, Linear is M*N*K, ReLU is one op per element."""
    height, width = 6, 5
    pixels = height * width
    report = count_ops(TinyNet(), (height, width))
    got = {(row.name, row.kind): (row.macs, row.params) for row in report.rows}
    assert got[("head", CONV)] == (pixels * 3 * 4 * 9, 4 * 3 * 9 + 4)
    assert got[("dw", CONV)] == (pixels * 1 * 4 * 9, 4 * 9 + 4)
    assert got[("act", OTHER)] == (pixels * 4, 0)
    assert got[("fc", LINEAR)] == (pixels * 4 * 12, 4 * 12 + 12)
    assert got[("shuffle", OTHER)] == (0, 0)  # pure data movement
    assert report.out_size == (2 * height, 2 * width)
    assert report.macs_by_kind() == {CONV: pixels * 144, LINEAR: pixels * 48, MATMUL: 0, OTHER: pixels * 4}


def test_swinir_tiny_attention_matmuls() -> None:
    """q@k^T and attn@v land on '<attn>.matmul' rows: windows * heads * 2 * N * N * head_dim MACs."""
    model = build_model("swinir-light", 2, tiny=True)  # embed 12, 2 heads, window 4
    report = count_ops(model, (8, 8))  # padded to 12x12: 9 windows of 16 tokens
    rows = [row for row in report.rows if row.kind == MATMUL]
    assert [row.name for row in rows] == [
        f"layers.{g}.residual_group.blocks.{b}.attn.matmul" for g in (0, 1) for b in (0, 1)
    ]
    assert all(row.macs == 9 * 2 * 2 * 16 * 16 * 6 for row in rows)
    qkv = report.row("layers.0.residual_group.blocks.0.attn.qkv")
    assert qkv.kind == LINEAR and qkv.macs == 144 * 12 * 36 and qkv.params == 12 * 36 + 36


def test_eswt_tiny_self_affinity_and_shift_conv() -> None:
    """ESWT's q@q^T is found per branch; a ShiftConv2d1x1 is a 1x1 conv plus a one-op-per-element shift."""
    model = build_model("eswt", 4, tiny=True)  # dim 10, windows 4x2 / 2x4, 1 head
    report = count_ops(model, (8, 8))  # 8x8 needs no window padding
    branch = report.row("body.0.sa_list.0.branches.0.matmul")
    assert branch.kind == MATMUL and branch.macs == 2 * 64 * 8 * 5  # two matmuls, 8-token windows, 5 channels
    assert report.row("body.0.mlp_list.0.fc1", CONV).macs == 64 * 10 * 20
    shift = report.row("body.0.mlp_list.0.fc1", OTHER)
    assert shift.macs == 64 * 10 and shift.params == 10 * 9  # the frozen shift kernel


def test_lmlt_tiny_matmuls_per_level() -> None:
    """LMLT's pooled levels each own a matmul row."""
    report = count_ops(build_model("lmlt-tiny", 2, tiny=True), (8, 8))
    names = report.names(MATMUL)
    assert {name.rsplit(".", 2)[-2] for name in names} == {"0", "1", "2", "3"}  # feats.*.lhsb.mfr.<level>.matmul
    assert all(report.row(name).macs > 0 for name in names)


class SdpaAttention(nn.Module):
    """Attention through ``F.scaled_dot_product_attention`` (a fused op, not two matmuls)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Self-attention of the 2 heads of 4 channels over the pixels of ``x`` ``[1, 8, H, W]``."""
        tokens = x.flatten(2).view(1, 2, 4, -1).transpose(-2, -1)
        out = nn.functional.scaled_dot_product_attention(tokens, tokens, tokens)
        return out.transpose(-2, -1).reshape(x.shape)


@pytest.mark.parametrize("meta", [True, False])
def test_fused_attention_counts_as_matmul(meta: bool) -> None:
    """A fused SDPA op counts its two matmuls: heads * L * S * (E + Ev) MACs."""
    model = nn.Sequential(nn.Conv2d(3, 8, 1), SdpaAttention())
    report = count_ops(model, (3, 4), meta=meta)
    assert report.row("1.matmul").macs == 2 * 12 * 12 * (4 + 4)


@pytest.mark.parametrize("name", ["swinir-light", "eswt", "lmlt-tiny", "imdn"])
def test_meta_and_real_pass_agree(name: str) -> None:
    """The meta-device pass counts exactly what the real forward pass counts, and leaves the model alone."""
    model = build_model(name, 4, tiny=True).train()
    meta = count_ops(model, (9, 11))
    real = count_ops(model, (9, 11), meta=False)
    assert meta == real
    assert all(module.training for module in model.modules())


# --- low-bit measures and storage ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_report() -> OpsReport:
    """Ops of the tiny SwinIR on a small input."""
    return count_ops(build_model("swinir-light", 4, tiny=True), (8, 8))


def test_full_precision_measures_equal_total(tiny_report: OpsReport) -> None:
    """Nothing quantized, or everything at 32 bit, gives the plain total (MACs; FLOPs doubles it)."""
    total = tiny_report.total_macs
    everything = tiny_report.names()
    assert ops_at_bits(tiny_report, {}) == total
    assert ops_at_bits(tiny_report, dict.fromkeys(everything, 32)) == total
    assert bitops(tiny_report, {}) == total
    assert bitops(tiny_report, dict.fromkeys(everything, (32, 32))) == total
    assert ops_at_bits(tiny_report, {}, unit="flops") == bitops(tiny_report, {}, unit="flops") == 2 * total


def test_low_bit_measures(tiny_report: OpsReport) -> None:
    """Ops at N bits scales a row by N/32; BitOPs by (w/32)*(a/32)."""
    row = tiny_report.row("layers.0.residual_group.blocks.0.mlp.fc1")
    rest = tiny_report.total_macs - row.macs
    assert ops_at_bits(tiny_report, {row.name: 4}) == rest + row.macs / 8
    assert bitops(tiny_report, {row.name: (4, 8)}) == rest + row.macs / 32
    matmul = tiny_report.row("layers.0.residual_group.blocks.0.attn.matmul")
    assert bitops(tiny_report, {matmul.name: (8, 8)}) == tiny_report.total_macs - matmul.macs * (1 - 1 / 16)


def test_bad_names_and_bits_raise(tiny_report: OpsReport) -> None:
    """Unknown or 'other' rows and bit-widths outside 1..32 are errors, not silent full precision."""
    with pytest.raises(SrquantError, match="not conv/linear/matmul"):
        ops_at_bits(tiny_report, {"layers.0.residual_group.blocks.0.mlp.fc9": 4})
    with pytest.raises(SrquantError, match="not conv/linear/matmul"):
        bitops(tiny_report, {"layers.0.residual_group.blocks.0.norm1": (4, 4)})
    with pytest.raises(SrquantError, match="1..32"):
        ops_at_bits(tiny_report, {"conv_first": 0})
    with pytest.raises(SrquantError, match="1..32"):
        bitops(tiny_report, {"conv_first": (4, 33)})
    with pytest.raises(SrquantError, match="unit"):
        ops_at_bits(tiny_report, {}, unit="gops")  # type: ignore[arg-type]


def test_param_bytes_hand_count() -> None:
    """Weights of named modules at their bits (rounded up to bytes), all other parameters at 4 bytes."""
    model = TinyNet()
    full = (4 * 27 + 4) + (4 * 9 + 4) + (48 + 12)
    assert param_count(model) == full and param_bytes(model, {}) == 4 * full
    packed = param_bytes(model, {"fc": 4, "head": 3})
    assert packed == 4 * full - 4 * 48 + 24 - 4 * 108 + 41  # 48 weights at 4 bit; 108 at 3 bit -> 40.5 -> 41 B
    with pytest.raises(SrquantError, match="weight parameter"):
        param_bytes(model, {"act": 4})


def test_buffers_never_count_and_frozen_parameters_optional() -> None:
    """SwinIR's index/mask buffers are not storage; ESWT's frozen shift kernels are, unless learned_only."""
    swinir = build_model("swinir-light", 4, tiny=True)
    assert param_bytes(swinir, {}) == 4 * sum(p.numel() for p in swinir.parameters())
    tables = sum(p.numel() for n, p in swinir.named_parameters() if n.endswith("relative_position_bias_table"))
    assert param_count(swinir, exclude=SWINIR_PAPER_EXCLUDES) == param_count(swinir) - tables > 0
    eswt = build_model("eswt", 4, tiny=True)
    frozen = sum(p.numel() for p in eswt.parameters() if not p.requires_grad)
    assert frozen > 0 and param_count(eswt, learned_only=True) == param_count(eswt) - frozen


def test_lr_size_for_output() -> None:
    """The LR sides whose output is 1280x720: exact at x2/x4, 1280/3 rounded to 427 at x3."""
    assert lr_size_for_output(2) == (360, 640)
    assert lr_size_for_output(3) == (240, 427)
    assert lr_size_for_output(4) == (180, 320)
    assert lr_size_for_output(4, (512, 512)) == (128, 128)


def test_units_are_explicit() -> None:
    """MB is 10**6 bytes, MiB 2**20."""
    assert to_mb(3_588_912) == pytest.approx(3.588912) and to_mib(3_588_912) == pytest.approx(3.42265, abs=1e-5)
    assert GIGA == 10**9


# --- SwinIR-light x4: 2DQuant Tables 1 and 2 -----------------------------------------------------------------

PIXELS_2DQUANT = 128 * 128
"""Token grid of 2DQuant's ops script: img_size = 512 // 4 = 128 (a 512x512 output)."""
LR_FOR_128 = (120, 120)
"""Our SwinIR pads 1..8 pixels like the official test, so a 120x120 LR runs the network on exactly 128x128."""


@pytest.fixture(scope="module")
def swinir_x4() -> nn.Module:
    """Full SwinIR-light x4 with random weights (counts do not depend on the values)."""
    return build_model("swinir-light", 4)


@pytest.fixture(scope="module")
def report_128(swinir_x4: nn.Module) -> OpsReport:
    """Measured ops with the network running on 2DQuant's 128x128 grid."""
    return count_ops(swinir_x4, LR_FOR_128)


def linear_names(report: OpsReport) -> list[str]:
    """2DQuant's quantized set: every Linear (qkv, proj, fc1, fc2) and every attention matmul."""
    return report.names(LINEAR, MATMUL)


def swinir_formula_parts(report: OpsReport) -> dict[str, int]:
    """SwinIR's ``flops()`` / 2DQuant's ``flops_all`` buckets, rebuilt from measured rows with its three slips."""
    convs = {row.name: row.macs for row in report.rows if row.kind == CONV}
    norms = [
        row.macs
        for row in report.rows
        if row.kind == OTHER and row.name.endswith(("norm1", "norm2", "patch_embed.norm"))
    ]
    return {
        "linear": sum(report.row(name).macs for name in linear_names(report)),
        "conv": convs["conv_first"]
        + sum(macs for name, macs in convs.items() if name.startswith("layers."))
        + convs["conv_after_body"] // 3,  # counted as 3*C*C per pixel instead of 9*C*C
        "other": sum(norms) + convs["upsample.0"] // 16,  # upsampler counted as C*3*9, not C*3*16*9
    }


def test_swinir_measured_ops_on_2dquant_grid(report_128: OpsReport) -> None:
    """Exact measured MACs on the 128x128 grid (the network itself, every op counted)."""
    assert report_128.out_size == (480, 480)
    kinds = report_128.macs_by_kind()
    assert kinds == {CONV: 3_105_423_360, LINEAR: 11_324_620_800, MATMUL: 3_019_898_880, OTHER: 553_287_680}
    assert kinds[LINEAR] == PIXELS_2DQUANT * 24 * (180 + 60 + 120 + 120) * 60
    assert kinds[MATMUL] == PIXELS_2DQUANT * 24 * 2 * 64 * 60
    assert report_128.total_macs == 18_003_230_720


def test_2dquant_table2_breakdown(report_128: OpsReport) -> None:
    """Table 2: Linear+BMM 14.34 G (85.66%), Conv 2.33 G (13.90%), other 0.07 G (0.44%)."""
    parts = swinir_formula_parts(report_128)
    assert parts == {"linear": 14_344_519_680, "conv": 2_326_855_680, "other": 74_711_040}
    assert (g2(parts["linear"]), g2(parts["conv"]), g2(parts["other"])) == (14.34, 2.33, 0.07)
    total = sum(parts.values())
    assert total == 16_746_086_400 == 1_022_100 * PIXELS_2DQUANT  # SwinIR flops() per pixel x 128*128
    assert round(100 * parts["linear"] / total, 2) == 85.66
    # The paper prints 13.90% and 0.44%; exact shares are 13.895% and 0.446%, summing the same 14.34%.
    assert round(100 * parts["conv"] / total, 3) == 13.895 and round(100 * parts["other"] / total, 3) == 0.446
    # Linear+BMM is exact, not a formula artefact: the measured Linear and matmul rows give the same integer.
    assert report_128.macs_by_kind()[LINEAR] + report_128.macs_by_kind()[MATMUL] == parts["linear"]


def test_2dquant_table1_ops(report_128: OpsReport) -> None:
    """Table 1: 16.74 G at FP and 4.19 G with Linear+BMM at 4 bits (all convs FP)."""
    parts = swinir_formula_parts(report_128)
    total = sum(parts.values())
    assert round(to_giga(total), 3) == 16.746  # rounds to 16.75; the paper's 16.74 is 14.34 + 2.33 + 0.07
    assert g2(parts["linear"]) + g2(parts["conv"]) + g2(parts["other"]) == pytest.approx(16.74)
    four_bit = parts["linear"] * 4 / 32 + parts["conv"] + parts["other"]
    assert four_bit == 4_194_631_680 and g2(four_bit) == 4.19
    # speed-ups 3.99x / 4.47x / 5.08x at 4 / 3 / 2 bits
    speedups = [round(total / (parts["linear"] * bits / 32 + parts["conv"] + parts["other"]), 2) for bits in (4, 3, 2)]
    assert speedups == [3.99, 4.47, 5.08]


def test_2dquant_ops_measured_with_our_convention(report_128: OpsReport) -> None:
    """The same configuration with every op counted: 18.00 G at FP, 5.45 G at 4 bits (not the paper's)."""
    quantized = dict.fromkeys(linear_names(report_128), 4)
    assert len(quantized) == 24 * 4 + 24  # 96 Linear layers and 24 attention matmul rows
    assert ops_at_bits(report_128, quantized) == 5_451_776_000
    assert g2(report_128.total_macs) == 18.0 and g2(ops_at_bits(report_128, quantized)) == 5.45
    # BitOPs (W4A4 on the same set) for comparison: Linear+BMM weighted by 1/64
    assert bitops(report_128, dict.fromkeys(quantized, (4, 4))) == 3_658_711_040 + 14_344_519_680 / 64


def test_2dquant_table1_params(swinir_x4: nn.Module, report_128: OpsReport) -> None:
    """Table 1: 3.42 (MiB) at FP and 1.17 (MB, decimal) with Linear weights at 4 bits; bias tables excluded."""
    assert param_count(swinir_x4) == 929_628  # every parameter, bias tables (24 x 225 x 6 = 32,400) included
    assert param_count(swinir_x4, exclude=SWINIR_PAPER_EXCLUDES) == 897_228
    fp = param_bytes(swinir_x4, {}, exclude=SWINIR_PAPER_EXCLUDES)
    assert fp == 3_588_912 and round(to_mib(fp), 2) == 3.42 and round(to_mb(fp), 2) == 3.59
    linears = report_128.names(LINEAR)
    assert sum(report_128.row(name).params for name in linears) == 701_280  # weights 691,200 + biases 10,080
    sizes = {
        bits: param_bytes(swinir_x4, dict.fromkeys(linears, bits), exclude=SWINIR_PAPER_EXCLUDES) for bits in (4, 3, 2)
    }
    assert sizes[4] == 1_169_712 and round(to_mb(sizes[4]), 2) == 1.17 and round(to_mib(sizes[4]), 2) == 1.12
    # compression ratios 3.07x / 3.31x / 3.60x are unit-free and agree
    assert [round(fp / sizes[bits], 2) for bits in (4, 3, 2)] == [3.07, 3.31, 3.6]
    # with the bias tables stored too (what the network needs): 3.55 MiB / 1.30 MB
    assert param_bytes(swinir_x4, {}) == 3_718_512 and param_bytes(swinir_x4, dict.fromkeys(linears, 4)) == 1_299_312


def test_swinir_paper_mult_adds(swinir_x4: nn.Module) -> None:
    """SwinIR's own 49.6 G (x4 light): the same formula on its script's 264x184 grid (a 1024x720 output)."""
    report = count_ops(swinir_x4, (180, 256))  # pads to 184x264, as the official script sizes it
    parts = swinir_formula_parts(report)
    assert sum(parts.values()) == 1_022_100 * 184 * 264 == 49_649_529_600
    assert report.total_macs == 53_376_766_080  # every op counted on that grid


def test_swinir_1280x720_output(swinir_x4: nn.Module) -> None:
    """At a 1280x720 output (LR 180x320, padded to 184x328) the counts are ~4x the paper's 16.74 G."""
    report = count_ops(swinir_x4, lr_size_for_output(4))
    assert report.out_size == (720, 1280)
    assert sum(swinir_formula_parts(report).values()) == 1_022_100 * 184 * 328
    pixels = 184 * 328
    assert report.macs_by_kind() == {
        CONV: pixels * 189_540,  # 3x3 convs: 3->60, 4x 60->60, 60->60, 60->48
        LINEAR: pixels * 691_200,
        MATMUL: pixels * 184_320,
        OTHER: 2_038_087_040,
    }
    assert round(to_giga(report.total_macs), 2) == 66.32


@pytest.mark.parametrize(
    ("name", "giga"),
    [("imdn", 40.9), ("pan", 28.2), ("carn-m", 32.5)],
)
def test_cnn_mult_adds_at_1280x720(name: str, giga: float) -> None:
    """Conv MACs at a 1280x720 output match the Mult-Adds the CNN papers publish for x4."""
    report = count_ops(build_model(name, 4), lr_size_for_output(4))
    assert round(to_giga(report.macs_by_kind()[CONV]), 1) == giga
