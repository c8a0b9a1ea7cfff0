"""AdaBM on the shipped CNNs (x4): fixed bits vs adaptive bits at bases W4A4 and W8A6, and an ablation on IMDN W4A4.
PSNR/SSIM (BasicSR convention), per-image FAB and BitOPs as `srquant eval` reports them, calibration time.
Resumable: finished cells live in docs/results/adabm_<preset>.json and are skipped on a re-run.

    python benchmarks/adabm_table.py --assets ../shared/assets [--preset cpu] [--only imdn:4:fixed,pan:W8A6]
        [--datasets Set5,Set14] [--results PATH.json] [--table-only]

Cells (`NAME|WxAy|VARIANT`): `fixed` (image2bit and layer2bit off: the same quantizer and fine-tuning at the
base bits), `adabm` (defaults) for imdn, pan and carn-m at W4A4 and W8A6; on IMDN W4A4 also `image2bit-only`,
`layer2bit-only` and `no-bac` (both adaptations, no bit-aware clipping). Each cell is quantized through
`api.quantize(..., "adabm", ...)` on <assets>/calibration/train291 with per-tensor weights (as the stored cells
were), saved as a checkpoint and evaluated from it by `api.evaluate_model`, the code path of
`srquant eval --model Q.pt`.
"""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

from common import RESULTS, fp_scores, header, load_json, run_main, update_json

from srquant import api
from srquant.quant.accounting import model_cost

SCALE = 4
DATASETS = ["Set5", "Set14", "B100", "Urban100"]
NETWORKS = ("imdn", "pan", "carn-m")
WEIGHT_GRANULARITY = "tensor"  # the stored cells were measured per tensor (before per-channel weights existed)
BASES = ((4, 4), (8, 6))  # AdaBM run.sh's two base configurations, (w_bits, a_bits)
VARIANTS: dict[str, dict[str, bool]] = {
    "fixed": {"image2bit": False, "layer2bit": False},
    "adabm": {},
    "image2bit-only": {"image2bit": True, "layer2bit": False},
    "layer2bit-only": {"image2bit": False},
    "no-bac": {"bit_aware_clipping": False},
}
MAIN = ("fixed", "adabm")
ABLATION = ("fixed", "image2bit-only", "layer2bit-only", "adabm", "no-bac")  # rows of the ablation table
ABLATION_CELL = ("imdn", (4, 4))
PLAN: list[tuple[str, tuple[int, int], str]] = (
    [(name, BASES[0], v) for name in NETWORKS for v in MAIN]
    + [(*ABLATION_CELL, v) for v in ABLATION if v not in MAIN]
    + [(name, BASES[1], v) for name in NETWORKS for v in MAIN]
)
# ../shared/reference/papers.md sections 2.5 and 5, tag [OAPTQ-note]: a third-party note on "Outlier-Aware PTQ
# for Image SR" (ICCV'25, arXiv 2511.00682), a secondary source. EDSR x4 W4A4, FP 32.10 (Set5) / 26.04 (Urban100).
FOR_SCALE = {
    "AdaBM": {"Set5": (31.02, 32.10), "Urban100": (25.11, 26.04)},
    "OAPTQ": {"Set5": (31.54, 32.10), "Urban100": (25.61, 26.04)},
}


def base_label(base: tuple[int, int]) -> str:
    """`W4A4` for (4, 4): the base part of a cell key."""
    return f"W{base[0]}A{base[1]}"


def cell_key(name: str, base: tuple[int, int], variant: str) -> str:
    """Results key of one cell, e.g. `imdn|W4A4|adabm`."""
    return f"{name}|{base_label(base)}|{variant}"


def parse_only(text: str) -> list[tuple[str, tuple[int, int], str]]:
    """`NAME:BASE[:VARIANT],...` (BASE `4` = W4A4, or `W8A6`) -> cells; without VARIANT, that base's planned cells."""
    cells = []
    for item in text.split(","):
        parts = item.strip().split(":")
        match = re.fullmatch(r"[wW]?(\d+)(?:[aA](\d+))?", parts[1]) if len(parts) in (2, 3) else None
        if match is None:
            raise SystemExit(f"--only: expected NAME:BASE[:VARIANT] (BASE 4 or W8A6), got {item!r}")
        base = (int(match[1]), int(match[2] or match[1]))
        if len(parts) == 3:
            if parts[2] not in VARIANTS:
                raise SystemExit(f"--only: unknown variant {parts[2]!r}; choose from {', '.join(VARIANTS)}")
            cells.append((parts[0], base, parts[2]))
        else:
            planned = [v for n, b, v in PLAN if (n, b) == (parts[0], base)]
            cells += [(parts[0], base, v) for v in planned or MAIN]
    return cells


def run_cell(
    name: str, base: tuple[int, int], variant: str, assets: str | None, preset: str, datasets: list[str]
) -> dict:
    """Quantize one network by AdaBM with one variant's switches, save it, evaluate the checkpoint like `eval`."""
    result = api.quantize(
        name,
        SCALE,
        "adabm",
        *base,
        preset=preset,
        assets=assets,
        device="cpu",
        weight_granularity=WEIGHT_GRANULARITY,
        **VARIANTS[variant],
    )
    cost = model_cost(result.network, SCALE)  # size; BitOPs here are at the base bits (measured ones: per image)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}_{base_label(base)}_{variant}.pt"
        file_bytes = result.save(path, {"variant": variant})
        evaluation = api.evaluate_model(
            path, SCALE, datasets, ("basicsr",), assets, device="cpu", progress=False, record_bits=True
        )
    scores = {}
    for r in evaluation.results:
        image_fab = [entry["fab"] for entry in evaluation.bits[r.dataset].values()]
        scores[r.dataset] = {
            "psnr": r.psnr,
            "ssim": r.ssim,
            "fab": r.extras["fab"],
            "bitops_g": r.extras["bitops_g"],
            "fab_min": min(image_fab),
            "fab_max": max(image_fab),
            "images": r.images,
            "eval_seconds": r.seconds,
        }
    return {
        "variant": variant,
        "w_bits": base[0],
        "a_bits": base[1],
        "settings": result.settings,  # the AdaBM config used (switches included) and the crop size
        "calib_seconds": result.calib_seconds,
        "rollbacks": result.rollbacks,
        "size_mb": cost.size_mb,
        "fp_size_mb": cost.fp_size_mb,
        "file_mb": file_bytes / 1e6,
        "base_bitops_g": cost.bitops_g,
        "fp_ops_g": cost.fp_ops_g,
        "scores": scores,
        "quantized": result.report.summary(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", default=None)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--only", default=None, help="comma list of NAME:BASE[:VARIANT] cells (default: the plan)")
    parser.add_argument("--datasets", default=",".join(DATASETS), help="comma list (default: the four benchmarks)")
    parser.add_argument(
        "--results", type=Path, default=None, help="results JSON (default docs/results/adabm_<preset>.json)"
    )
    parser.add_argument("--table-only", action="store_true", help="write the table from the results file")
    args = parser.parse_args()
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    plan = parse_only(args.only) if args.only else PLAN
    default_store = RESULTS / f"adabm_{args.preset}.json"
    store: Path = args.results or default_store
    for name, base, variant in [] if args.table_only else plan:
        fp = load_json(store).get(f"{name}|fp", {})
        if any(ds not in fp for ds in datasets):
            update_json(store, f"{name}|fp", {**fp, **fp_scores(name, SCALE, datasets, args.assets)})
        key = cell_key(name, base, variant)
        done = load_json(store).get(key)
        if done is not None and all(ds in done["scores"] for ds in datasets):
            continue
        cell = run_cell(name, base, variant, args.assets, args.preset, datasets)
        update_json(store, key, cell)
        first = cell["scores"][datasets[0]]
        print(
            f"{key:<28} {datasets[0]} {first['psnr']:.2f} FAB {first['fab']:.2f}  calib {cell['calib_seconds']:.0f}s"
            f"  rollbacks {len(cell['rollbacks'])}",
            flush=True,
        )
    canonical = store.resolve() == default_store.resolve()
    produced_by = f"python benchmarks/adabm_table.py --assets ../shared/assets --preset {args.preset}"
    write_table(load_json(store), args.preset, datasets, store.with_suffix(".md"), produced_by if canonical else None)


def _scores(cell: dict, ref: dict, datasets: list[str]) -> list[str]:
    """`PSNR/SSIM (delta)` per dataset against `ref`'s PSNR; `-` where the cell lacks the dataset."""
    out = []
    for d in datasets:
        got = cell["scores"].get(d)
        delta = f" ({got['psnr'] - ref[d]['psnr']:+.2f})" if got and d in ref else ""
        out.append(f"{got['psnr']:.2f}/{got['ssim']:.4f}{delta}" if got else "-")
    return out


def _per_dataset(cell: dict, datasets: list[str], field: str) -> str:
    """One number per dataset, `/`-joined in dataset order."""
    return "/".join(f"{cell['scores'][d][field]:.2f}" if d in cell["scores"] else "-" for d in datasets)


def write_table(done: dict, preset: str, datasets: list[str], out: Path, produced_by: str | None) -> None:
    """Markdown: FP/fixed/AdaBM per network and base, the IMDN W4A4 ablation, and published drops for scale."""
    lines = [header(f"AdaBM, x4, BasicSR convention, preset `{preset}`", produced_by), ""]
    lines.append(
        "Cells are resumable and may be run by workers with `--only NAME:BASE[:VARIANT],...`, one torch thread "
        "each, sharing the cores: calibration times are upper bounds.\n"
    )
    lines.append(
        "`fixed` = AdaBM with Image2Bit and Layer2Bit off: the same symmetric weight and EMA-min/max activation "
        "quantizers, bit-aware clipping at the base bits and the same weight/activation-bound fine-tuning (the bit "
        "phases keep their place in the schedule but take no step). `adabm` = defaults. Body convs adaptive, head, "
        "upsampler and tail FP. Each model is saved and evaluated from its checkpoint as `srquant eval` does.\n"
    )
    lines.append(
        "Drop = PSNR - FP PSNR. FAB: mean activation bit over the adaptive layers per image, averaged over the "
        "images of each dataset (in dataset order, `/`-separated). BitOPs: G, MACs-based, for a 1280x720 output "
        "at the bits each image got (sum of ops * w/32 * a/32; FP modules at 32/32), averaged over the images; the "
        "FP row gives the float MACs. Calib s: wall time of `quantize_model` (crops, calibration, BaC, "
        "fine-tuning). Size: parameter storage in decimal MB.\n"
    )
    short = {"Set5": "S5", "Set14": "S14", "B100": "B100", "Urban100": "U100", "Manga109": "M109"}
    names = "/".join(short.get(d, d) for d in datasets)
    cols = " | ".join(f"{d} PSNR/SSIM (drop)" for d in datasets)
    lines.append(f"| model | base | method | {cols} | FAB {names} | BitOPs G {names} | calib s | size MB | rollbacks |")
    lines.append("|---" * (8 + len(datasets)) + "|")
    for name in NETWORKS:
        fp = done.get(f"{name}|fp")
        cells = {b: [(v, done.get(cell_key(name, b, v))) for v in MAIN] for b in BASES}
        if not fp or not any(c for row in cells.values() for _, c in row):
            continue
        fp_ops = next((c["fp_ops_g"] for row in cells.values() for _, c in row if c), None)
        fp_cells = " | ".join(f"{fp[d]['psnr']:.2f}/{fp[d]['ssim']:.4f}" if d in fp else "-" for d in datasets)
        fp_bops = f"{fp_ops:.2f}" if fp_ops is not None else "-"
        lines.append(f"| {name} | FP | - | {fp_cells} | 32 | {fp_bops} | - | - | - |")
        for base, row in cells.items():
            for variant, cell in row:
                if cell is None:
                    continue
                lines.append(
                    f"| {name} | {base_label(base)} | {variant} | {' | '.join(_scores(cell, fp, datasets))} | "
                    f"{_per_dataset(cell, datasets, 'fab')} | {_per_dataset(cell, datasets, 'bitops_g')} | "
                    f"{cell['calib_seconds']:.0f} | {cell['size_mb']:.3f} | {len(cell['rollbacks'])} |"
                )
    name, base = ABLATION_CELL
    rows = [(v, done.get(cell_key(name, base, v))) for v in ABLATION]
    fixed = done.get(cell_key(name, base, "fixed"))
    if any(c for v, c in rows if v not in MAIN):
        lines += ["", f"## Ablation: {name} x{SCALE}, base {base_label(base)}", ""]
        lines.append("Delta = PSNR - the `fixed` cell's PSNR. `adabm` has both adaptations and BaC.\n")
        cols = " | ".join(f"{d} PSNR/SSIM (delta)" for d in datasets)
        lines.append(f"| variant | Image2Bit | Layer2Bit | BaC | {cols} | FAB {names} | BitOPs G {names} | calib s |")
        lines.append("|---" * (7 + len(datasets)) + "|")
        for variant, cell in rows:
            if cell is None:
                continue
            used = cell["settings"]["adabm"]
            on = ["yes" if used[k] else "no" for k in ("image2bit", "layer2bit", "bit_aware_clipping")]
            scores = _scores(cell, fixed["scores"] if fixed else {}, datasets)
            lines.append(
                f"| {variant} | {' | '.join(on)} | {' | '.join(scores)} | {_per_dataset(cell, datasets, 'fab')} | "
                f"{_per_dataset(cell, datasets, 'bitops_g')} | {cell['calib_seconds']:.0f} |"
            )
    lines += ["", "## For scale: published W4A4 drops (EDSR x4, not these networks)", ""]
    lines.append(
        "From `../shared/reference/papers.md` (sections 2.5 and 5), tag `[OAPTQ-note]`: a third-party note on "
        "*Outlier-Aware PTQ for Image SR* (ICCV'25, arXiv 2511.00682), a secondary source. AdaBM's own tables were "
        "not found, and the note gives no FAB for its AdaBM row. EDSR x4 FP: Set5 32.10, Urban100 26.04.\n"
    )
    lines.append("| method | Set5 PSNR (drop) | Urban100 PSNR (drop) |")
    lines.append("|---|---|---|")
    for method, figures in FOR_SCALE.items():
        parts = [f"{got:.2f} ({got - ref:+.2f})" for got, ref in figures.values()]
        lines.append(f"| {method} | {' | '.join(parts)} |")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    run_main(main)
