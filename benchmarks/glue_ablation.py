"""What quantizing the tensors between layers (integer glue, `--glue-bits 8`) costs, group by group, on Set5.

    python benchmarks/glue_ablation.py --assets ../shared/assets [--models imdn,pan,carn-m] [--method minmax]
        [--pan-released-order] [--summary]

For each network: the deploy recipe (`--deploy onnxruntime`: W7A8 everywhere, symmetric per-channel weights,
simulated 8-bit outputs) without glue (`conv only`), with every glue tap quantized
(`all glue`), and with one group of taps quantized at a time (`only <group>`; the other taps are left out by
`keep_fp`, so layers that would share a left-out tap's grid keep their own). Taps are grouped by name with
block indices replaced by `#`. `--pan-released-order` adds PAN computed as released, LeakyReLU(x * gate) in
its upsampling, with a tap on the product: the order srquant replaced (docs/deploy.md). Set5 PSNR (BasicSR
convention) of the fake-quant model; no timing, so the machine may be busy.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from common import RESULTS, header, load_json, run_main, update_json
from torch import nn

from srquant import api
from srquant.evaluate import evaluate
from srquant.methods.pipeline import quantize_model
from srquant.models import pan
from srquant.models.registry import get_entry
from srquant.quant.quantize import GLUE_HOOK_SUFFIX
from srquant.quant.spec import QuantSpec

OUT = RESULTS / "glue_ablation.json"
SCALE = 4


@contextmanager
def released_pan_order() -> Iterator[None]:
    """PAN's upsampling as released, act(x * gate), with a glue tap on the product (what srquant replaced)."""

    def upsample(self: pan.PAN, x: torch.Tensor, factor: int, stage: int) -> torch.Tensor:
        upconv, att, hrconv = (getattr(self, f"{part}{stage}") for part in ("upconv", "att", "HRconv"))
        x = upconv(F.interpolate(x, scale_factor=factor, mode="nearest"))
        return getattr(self, f"up{stage}_glue")(self.act(hrconv(self.act(att.product_glue(att(x))))))

    saved = pan.PAN._upsample
    pan.PAN._upsample = upsample
    try:
        yield
    finally:
        pan.PAN._upsample = saved


def glue_groups(model: nn.Module) -> dict[str, list[str]]:
    """The model's glue taps, grouped by name with indices replaced by `#`."""
    groups: dict[str, list[str]] = {}
    for name, _ in model.named_modules(remove_duplicate=False):
        if name.endswith(GLUE_HOOK_SUFFIX):
            groups.setdefault(re.sub(r"\d+", "#", name), []).append(name)
    return groups


def load(name: str, assets: str, released: bool) -> nn.Module:
    """The zoo network; for the released PAN order, with the extra product taps that order needs."""
    model = api.load_model(name, SCALE, assets)
    if released:
        for stage, att in ((1, model.att1), (2, model.att2)):
            att.product_glue = nn.Identity()
            delattr(model, f"up{stage}_act_glue")  # that order has no activation tap before the product
    return model


def set5_psnr(name: str, assets: str, method: str, glue: bool, keep_fp: tuple[str, ...], released: bool) -> float:
    """Quantize the zoo network by the deploy recipe (W7A8) and score the fake-quant model on Set5."""
    model = load(name, assets, released)
    fields = {"weight_granularity": "channel", "matmul": False, "keep_fp": keep_fp}
    w_bits, fields = api.deploy_recipe("onnxruntime", model, 8, 8, fields)
    spec = QuantSpec(w_bits, 8, **{**fields, "glue_bits": 8 if glue else None})
    root = Path(assets)
    calib = root / "calibration" / "train291"
    quantize_model(model, get_entry(name).layout, method, spec, calib, datasets_root=root / "datasets")
    return evaluate(model, ["Set5"], SCALE, ["basicsr"], assets, progress=False)[0].psnr


def run(name: str, assets: str, method: str, released: bool, summary: bool) -> None:
    """All rows of one network (and recipe variant; only `conv only` and `all glue` with `summary`), one JSON
    cell each."""
    groups = glue_groups(load(name, assets, released))
    every = [n for names in groups.values() for n in names]
    label = f"{name} (released order)" if released else name
    rows = {"conv only": (False, ()), "all glue": (True, ())}
    for group, names in {} if summary else groups.items():
        rows[f"only {group}"] = (True, tuple(re.escape(n) for n in every if n not in names))
    for row, (glue, keep_fp) in rows.items():
        if released and row == "conv only":
            continue
        psnr = set5_psnr(name, assets, method, glue, keep_fp, released)
        update_json(OUT, f"{label}|{method}|{row}", {"psnr": psnr, "taps": len(every) - len(keep_fp) if glue else 0})
        print(f"{label:<22} {method:<10} {row:<40} {psnr:.3f}", flush=True)


def table() -> str:
    """The markdown results, one section per network and calibration method."""
    data = load_json(OUT)
    produced_by = (
        "python benchmarks/glue_ablation.py --assets ../shared/assets --pan-released-order`, then the same with "
        "`--models imdn,pan --method dobi --summary` and `--models imdn,pan --method percentile --summary "
        "--pan-released-order"
    )
    lines = [header("Integer glue: Set5 PSNR by quantized group (W7A8 full, fake-quant)", produced_by), ""]
    sections: dict[tuple[str, str], list[tuple[str, dict]]] = {}
    for key, cell in data.items():
        label, method, row = key.split("|")
        sections.setdefault((label, method), []).append((row, cell))
    for (label, method), rows in sections.items():
        rows.sort(key=lambda item: (item[0] != "conv only", item[0] != "all glue", item[0]))
        lines += [f"## {label}, {method}", "", "| glue quantized | taps | Set5 PSNR |", "|---|---|---|"]
        lines += [f"| {row} | {cell['taps']} | {cell['psnr']:.3f} |" for row, cell in rows]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", required=True)
    parser.add_argument("--models", default="imdn,pan,carn-m")
    parser.add_argument("--method", default="minmax", choices=("minmax", "percentile", "dobi"))
    parser.add_argument("--pan-released-order", action="store_true")
    parser.add_argument("--summary", action="store_true", help="only the conv-only and all-glue rows")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    if not args.table_only:
        for name in args.models.split(","):
            run(name, args.assets, args.method, released=False, summary=args.summary)
        if args.pan_released_order:
            with released_pan_order():
                run("pan", args.assets, args.method, released=True, summary=args.summary)
    text = table()
    (RESULTS / "glue_ablation.md").write_text(text)
    print(text)


if __name__ == "__main__":
    run_main(main)
