"""PTQ baselines and 2DQuant on the shipped networks (x4): PSNR/SSIM, drop from FP, calibration time, size,
BitOPs. Resumable: finished cells live in docs/results/ptq.json and are skipped on a re-run.

    python benchmarks/ptq_table.py --assets ../shared/assets [--preset cpu] [--only imdn:4]

Order: every network at W4A4, then IMDN and LMLT-Tiny at W3A3 and W2A2; for each, minmax, percentile, dobi,
2dquant. Calibration images: <assets>/calibration/train291 (never a benchmark image).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import RESULTS, fp_scores, header, load_json, update_json

from srquant import evaluate, load_model
from srquant.methods.pipeline import quantize_model
from srquant.models.registry import get_entry
from srquant.quant.accounting import model_cost
from srquant.quant.spec import QuantSpec

SCALE = 4
METHODS = ("minmax", "percentile", "dobi", "2dquant")  # this table's methods (the dynamic ones have their own)
DATASETS = ["Set5", "Set14", "B100", "Urban100"]
PLAN = [(name, 4) for name in ("imdn", "lmlt-tiny", "pan", "carn-m", "eswt")] + [
    (name, bits) for bits in (3, 2) for name in ("imdn", "lmlt-tiny")
]
# 2DQuant Table 3, SwinIR-light x4, Set5 drop from FP (32.45 dB), for scale.
PAPER_SET5_DROP = {
    4: {"minmax": -3.82, "percentile": -1.81, "dobi": -1.35, "2dquant": -0.68},
    3: {"minmax": -13.04, "percentile": -4.90, "dobi": -2.86, "2dquant": -1.55},
    2: {"minmax": -8.49, "percentile": -9.42, "dobi": -3.63, "2dquant": -2.92},
}


def run_cell(name: str, bits: int, method: str, assets: str | None, preset: str) -> dict:
    """Quantize one network by one method and evaluate it on the four benchmarks."""
    root = Path(assets) if assets else None
    model = load_model(name, SCALE, assets)
    calib = (root / "calibration" / "train291") if root else Path("calibration/train291")
    datasets_root = root / "datasets" if root else None
    result = quantize_model(model, get_entry(name).layout, method, QuantSpec(bits, bits), calib, preset, datasets_root)
    cost = model_cost(model, SCALE)
    results = evaluate(model, DATASETS, SCALE, ["basicsr"], assets, progress=False)
    scores = {r.dataset: {"psnr": r.psnr, "ssim": r.ssim} for r in results}
    cell = {
        "calib_seconds": result.calib_seconds,
        "size_mb": cost.size_mb,
        "fp_size_mb": cost.fp_size_mb,
        "bitops_g": cost.bitops_g,
        "fp_ops_g": cost.fp_ops_g,
        "scores": scores,
        "quantized": result.report.summary(),
    }
    if result.dqc is not None:
        cell["dqc_rollbacks"] = result.dqc.rollbacks
    return cell


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--assets", default=None)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--only", default=None, help="comma list of name:bits cells to run (default: the plan)")
    parser.add_argument("--table-only", action="store_true", help="write the table from the results file")
    args = parser.parse_args()
    plan = [(n, int(b)) for n, b in (c.split(":") for c in args.only.split(","))] if args.only else PLAN
    store = RESULTS / f"ptq_{args.preset}.json"
    done = load_json(store)
    for name, bits in [] if args.table_only else plan:
        if f"{name}|fp" not in done:
            done = update_json(store, f"{name}|fp", fp_scores(name, SCALE, DATASETS, args.assets))
        for method in METHODS:
            key = f"{name}|W{bits}A{bits}|{method}"
            if key in load_json(store):
                continue
            cell = run_cell(name, bits, method, args.assets, args.preset)
            done = update_json(store, key, cell)
            s5 = cell["scores"]["Set5"]["psnr"]
            print(f"{key:<28} Set5 {s5:.2f}  calib {cell['calib_seconds']:.0f}s", flush=True)
    write_table(load_json(store), args.preset)


def ordering_report(done: dict, models: list[str]) -> list[str]:
    """Where the expected PSNR order minmax < percentile < dobi < 2dquant fails, per network, bits and dataset."""
    lines = ["## Ordering check (PSNR, minmax < percentile < dobi < 2dquant)", ""]
    for name in models:
        for bits in (4, 3, 2):
            cells = [done.get(f"{name}|W{bits}A{bits}|{m}") for m in METHODS]
            if any(c is None for c in cells):
                continue
            broken = []
            for d in DATASETS:
                values = [c["scores"][d]["psnr"] for c in cells]  # type: ignore[index]
                for i in range(len(METHODS) - 1):
                    if not values[i] < values[i + 1]:
                        broken.append(f"{d}: {METHODS[i]} {values[i]:.2f} >= {METHODS[i + 1]} {values[i + 1]:.2f}")
            verdict = "holds on all four sets" if not broken else "fails on " + "; ".join(broken)
            lines.append(f"- {name} W{bits}A{bits}: {verdict}")
    return lines


def write_table(done: dict, preset: str) -> None:
    """Markdown table: FP row, then each method with PSNR/SSIM and the drop from FP per dataset."""
    produced_by = f"python benchmarks/ptq_table.py --assets ../shared/assets --preset {preset}"
    lines = [header(f"PTQ baselines and 2DQuant, x4, BasicSR convention, preset `{preset}`", produced_by), ""]
    lines.append(
        "Cells are resumable and were run by workers with `--only NAME:BITS,...`, one torch thread each, while "
        "other benchmarks shared the 2 cores: calibration times are upper bounds (see the note below the "
        "table for a measurement on an idle machine).\n"
    )
    lines.append(
        "Drop = method PSNR - FP PSNR. Size: parameter storage in decimal MB. BitOPs: G, MACs-based, for a "
        "1280x720 output (sum of ops * w/32 * a/32). Calibration time includes loading the calibration images.\n"
    )
    cols = " | ".join(f"{d} PSNR/SSIM (drop)" for d in DATASETS)
    lines.append(f"| model | bits | method | {cols} | calib s | size MB | BitOPs G | 2DQuant Set5 drop |")
    lines.append("|---" * (7 + len(DATASETS)) + "|")
    models = list(dict.fromkeys(k.split("|")[0] for k in done))
    for name in models:
        fp = done.get(f"{name}|fp")
        if not fp:
            continue
        cells = " | ".join(f"{fp[d]['psnr']:.2f}/{fp[d]['ssim']:.4f}" for d in DATASETS if d in fp)
        lines.append(f"| {name} | FP | - | {cells} | - | - | - | - |")
        for bits in (4, 3, 2):
            for method in METHODS:
                cell = done.get(f"{name}|W{bits}A{bits}|{method}")
                if cell is None:
                    continue
                parts = []
                for d in DATASETS:
                    got = cell["scores"][d]
                    parts.append(f"{got['psnr']:.2f}/{got['ssim']:.4f} ({got['psnr'] - fp[d]['psnr']:+.2f})")
                paper = PAPER_SET5_DROP[bits][method]
                lines.append(
                    f"| {name} | W{bits}A{bits} | {method} | {' | '.join(parts)} | {cell['calib_seconds']:.0f} | "
                    f"{cell['size_mb']:.3f} | {cell['bitops_g']:.2f} | {paper:+.2f} |"
                )
    lines += ["", *ordering_report(done, models)]
    out = RESULTS / f"ptq_{preset}.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
