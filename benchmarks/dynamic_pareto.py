"""Do adaptive bits pay? AdaBM and Granular-DQ against their fixed-bit twins and random allocations of the same
bit histogram, PSNR against FAB and BitOPs, x4, BasicSR convention, preset cpu.

    python benchmarks/dynamic_pareto.py --assets ../shared/assets [--networks imdn,pan] [--datasets Set5,Urban100]
        [--only CELL,...] [--threads 1] [--table-only]

Cells (`NAME|METHOD|VARIANT`), each quantized through `api.quantize`, saved, and evaluated from its checkpoint
as `srquant eval` does:
- AdaBM at bases W4A4 and W8A6 (`adabm-w4a4`, `adabm-w8a6`): `adaptive` (srquant's measured allocation, the cpu
  preset), `paper` (AdaBM's own std/complexity allocation), `fixed` (`--no-adapt`: same quantizers, calibration,
  bit-aware clipping and fine-tuning at the base) and `random` (the `adaptive` checkpoint with its layer offsets
  shuffled and each image's offset drawn with the shares it gave that dataset).
- Granular-DQ, 8-bit weights: `budget4.5`, `budget5`, `budget5.5` (`--target-fab F --allocation measured`:
  srquant's measured allocation), `gbc4.5`, `gbc5` (`--target-fab F` on the paper's controller, trained through
  the L1 loss with the bit price), `fixed4`, `fixed5`, `fixed6` (`--no-adapt --abits B`), and for each budget a
  `random` twin with the patch-bit shares it gave that dataset.
Weights: per output channel for AdaBM (per channel measured better on every W4A4 PTQ cell,
docs/results/ptq_granularity.md), per tensor for Granular-DQ's 8-bit LSQ weights (as its paper).
Results: docs/results/dynamic.json (resumable), dynamic_cpu.md and dynamic_<network>.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from common import RESULTS, fp_scores, header, load_json, run_main, update_json

from srquant import api, evaluate

SCALE = 4
STORE = RESULTS / "dynamic.json"
ADABM_BASES = {"adabm-w4a4": (4, 4), "adabm-w8a6": (8, 6)}
BUDGETS = (4.5, 5.0, 5.5)
FIXED_GDQ = (4, 5, 6)
GDQ_VARIANTS = [f"budget{b:g}" for b in BUDGETS] + [f"fixed{b}" for b in FIXED_GDQ]


def plan(networks: list[str]) -> list[tuple[str, str, str]]:
    """Every quantized cell (random controls follow their adaptive cell)."""
    cells = []
    for name in networks:
        for method in ADABM_BASES:
            cells += [(name, method, v) for v in ("fixed", "adaptive", "random", "paper")]
        cells += [(name, "granular-dq", v) for v in GDQ_VARIANTS]
        cells += [(name, "granular-dq", f"random{b:g}") for b in BUDGETS]
    return cells


def quantize_cell(name: str, method: str, variant: str, assets: str | None, path: Path) -> dict:
    """Quantize one cell to `path`; returns its settings and timing."""
    if method in ADABM_BASES:
        w_bits, a_bits = ADABM_BASES[method]
        extra = {"no_adapt": variant == "fixed"}
        if variant == "paper":  # the paper's allocation, bit ranges and image bit
            extra.update(allocation="paper", layer_range=1, image2bit=True)
        result = api.quantize(
            name, SCALE, "adabm", w_bits, a_bits, assets=assets, device="cpu", weight_granularity="channel", **extra
        )
    else:
        if variant.startswith(("budget", "gbc")):
            target = float(variant.removeprefix("budget").removeprefix("gbc"))
            allocation = "measured" if variant.startswith("budget") else "paper"
            result = api.quantize(
                name, SCALE, "granular-dq", 8, 8, assets=assets, device="cpu", target_fab=target, allocation=allocation
            )
        else:
            bits = int(variant.removeprefix("fixed"))
            result = api.quantize(name, SCALE, "granular-dq", 8, bits, assets=assets, device="cpu", no_adapt=True)
    result.save(path, {"variant": variant})
    return {"settings": result.settings, "calib_seconds": result.calib_seconds, "rollbacks": result.rollbacks}


def shares_of(method: str, bits: dict[str, dict], base_bits: int, layer_offsets: list[float]) -> dict[int, float]:
    """The bit histogram a dynamic model gave one dataset: AdaBM image offsets, Granular-DQ patch bits."""
    counts: dict[int, float] = {}
    for entry in bits.values():
        if method in ADABM_BASES:
            layer_bits = list(entry["layers"].values())
            offset = round(sum(layer_bits) / len(layer_bits) - base_bits - sum(layer_offsets) / len(layer_offsets))
            counts[offset] = counts.get(offset, 0) + 1
        else:
            for patch in entry["patches"]:
                counts[int(patch["bit"])] = counts.get(int(patch["bit"]), 0) + 1
    return counts


def evaluate_cell(path: Path, datasets: list[str], assets: str | None) -> tuple[dict, dict]:
    """Scores per dataset and the per-image bit records of a checkpoint."""
    evaluation = api.evaluate_model(
        path, SCALE, datasets, ("basicsr",), assets, device="cpu", progress=False, record_bits=True
    )
    scores = {
        r.dataset: {"psnr": r.psnr, "ssim": r.ssim, "fab": r.extras["fab"], "bitops_g": r.extras["bitops_g"]}
        for r in evaluation.results
    }
    return scores, evaluation.bits


def random_cell(source: Path, method: str, datasets: list[str], assets: str | None, seed: int = 0) -> dict:
    """The random control of an adaptive checkpoint, per dataset with that dataset's histogram."""
    bits = load_json(source.with_suffix(".bits.json"))
    fitted = api.load_quantized(source, "cpu")
    base = int(fitted.controller.base_bits) if method in ADABM_BASES else 0
    offsets = fitted.controller.layer_bits().tolist() if method in ADABM_BASES else [0.0]
    scores, used = {}, {}
    for dataset in datasets:
        shares = shares_of(method, bits[dataset], base, offsets)
        control = api.random_control(source, shares, seed, device="cpu")
        r = evaluate(control, [dataset], SCALE, ["basicsr"], assets, progress=False)[0]
        scores[dataset] = {"psnr": r.psnr, "ssim": r.ssim, "fab": r.extras["fab"], "bitops_g": r.extras["bitops_g"]}
        used[dataset] = shares
    return {"scores": scores, "shares": {d: {str(k): v for k, v in s.items()} for d, s in used.items()}}


def run(
    name: str, method: str, variant: str, datasets: list[str], assets: str | None, work: Path, done: dict | None
) -> dict:
    """One cell, resumable through its checkpoint and bit records in `work`: a stored cell whose checkpoint is
    still there is only evaluated on the datasets it lacks (no second calibration)."""
    missing = [d for d in datasets if done is None or d not in done["scores"]]
    if variant.startswith("random"):
        source_variant = "adaptive" if method in ADABM_BASES else "budget" + variant.removeprefix("random")
        source = work / f"{name}_{method}_{source_variant}.pt"
        if not source.is_file():
            raise SystemExit(f"run {name}|{method}|{source_variant} before its random control")
        added = random_cell(source, method, missing, assets)
        if done is None:
            return added
        shares = {**done.get("shares", {}), **added["shares"]}
        return {**done, "scores": {**done["scores"], **added["scores"]}, "shares": shares}
    path = work / f"{name}_{method}_{variant}.pt"
    if done is None or not path.is_file():
        made = quantize_cell(name, method, variant, assets, path)
        missing, previous, old_bits = datasets, {}, {}
    else:
        made, previous = {k: v for k, v in done.items() if k != "scores"}, done["scores"]
        old_bits = load_json(path.with_suffix(".bits.json"))
    scores, bits = evaluate_cell(path, missing, assets)
    path.with_suffix(".bits.json").write_text(json.dumps({**old_bits, **bits}))
    return {**made, "scores": {**previous, **scores}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", default=None)
    parser.add_argument("--networks", default="imdn,pan")
    parser.add_argument("--datasets", default="Set5,Urban100")
    parser.add_argument("--only", help="comma list of NAME|METHOD|VARIANT cells")
    parser.add_argument("--work", type=Path, default=Path("/tmp/srquant_dynamic"), help="checkpoints and bits")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    datasets = args.datasets.split(",")
    cells = [tuple(c.split("|")) for c in args.only.split(",")] if args.only else plan(args.networks.split(","))
    for name, method, variant in [] if args.table_only else cells:
        if f"{name}|fp" not in load_json(STORE):
            update_json(STORE, f"{name}|fp", fp_scores(name, SCALE, ["Set5", "Set14", "B100", "Urban100"], args.assets))
        key = f"{name}|{method}|{variant}"
        done = load_json(STORE).get(key)
        if done is not None and all(d in done["scores"] for d in datasets):
            continue
        cell = run(name, method, variant, datasets, args.assets, args.work, done)
        update_json(STORE, key, cell)
        first = cell["scores"][datasets[0]]
        print(f"{key:<36} {datasets[0]} {first['psnr']:.2f} FAB {first['fab']:.2f}", flush=True)
    write_outputs(load_json(STORE), datasets)


def write_outputs(done: dict, datasets: list[str]) -> None:
    """The markdown table (with the verdicts at equal FAB) and one Pareto PNG per network."""
    networks = sorted({k.split("|")[0] for k in done if not k.endswith("|fp")})
    cells_by = (
        f"python benchmarks/dynamic_pareto.py --assets ../shared/assets --networks {','.join(networks)} "
        f"--datasets {','.join(datasets)} --threads 1 (cells in groups with --only, the table with --table-only)"
    )
    lines = [header("Adaptive bits against fixed bits and random allocations, x4, preset cpu", cells_by), ""]
    lines.append(
        "PSNR (BasicSR convention) / FAB (mean activation bit per image, averaged) / BitOPs (G, for a 1280x720 "
        "output) per dataset. `fixed-line`: the PSNR of the fixed-bit twins interpolated linearly in FAB at the "
        "adaptive cell's FAB (AdaBM: its own fixed twin at the base; Granular-DQ: between `fixed4`, `fixed5`, "
        "`fixed6`). `vs fixed` and `vs random` are the adaptive cell's PSNR minus theirs.\n"
    )
    cols = " | ".join(f"{d} PSNR / FAB / BitOPs" for d in datasets)
    lines.append(f"| network | method | variant | {cols} | vs fixed (" + ", ".join(datasets) + ") | vs random |")
    lines.append("|---" * (5 + len(datasets)) + "|")
    for name in networks:
        for key in sorted(k for k in done if k.startswith(name + "|") and not k.endswith("|fp")):
            _, method, variant = key.split("|")
            cell = done[key]
            shown = []
            for d in datasets:
                s = cell["scores"].get(d)
                shown.append(f"{s['psnr']:.2f} / {s['fab']:.2f} / {s['bitops_g']:.2f}" if s else "-")
            vs_fixed, vs_random = _verdicts(done, name, method, variant, datasets)
            lines.append(f"| {name} | {method} | {variant} | {' | '.join(shown)} | {vs_fixed} | {vs_random} |")
    (RESULTS / "dynamic_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    for name in networks:
        _plot(done, name, datasets)


def fixed_line(done: dict, name: str, method: str, dataset: str, fab: float) -> float | None:
    """The fixed twins' PSNR at `fab`, linear in FAB between the two nearest fixed cells (None outside them)."""
    if method in ADABM_BASES:
        cell = done.get(f"{name}|{method}|fixed")
        return cell["scores"][dataset]["psnr"] if cell and dataset in cell["scores"] else None
    points = sorted(
        (c["scores"][dataset]["fab"], c["scores"][dataset]["psnr"])
        for b in FIXED_GDQ
        if (c := done.get(f"{name}|granular-dq|fixed{b}")) and dataset in c["scores"]
    )
    for (f0, p0), (f1, p1) in zip(points, points[1:], strict=False):
        if f0 <= fab <= f1:
            return p0 + (p1 - p0) * (fab - f0) / (f1 - f0) if f1 > f0 else p0
    return None


def _verdicts(done: dict, name: str, method: str, variant: str, datasets: list[str]) -> tuple[str, str]:
    """`vs fixed` and `vs random` cells of an adaptive row (`-` for controls)."""
    if not (variant in ("adaptive", "paper") or variant.startswith(("budget", "gbc"))):
        return "-", "-"
    cell = done[f"{name}|{method}|{variant}"]
    fixed, random = [], []
    twin = "random" if method in ADABM_BASES else "random" + variant.removeprefix("budget")
    control = done.get(f"{name}|{method}|{twin}") if variant != "paper" and not variant.startswith("gbc") else None
    for d in datasets:
        s = cell["scores"].get(d)
        line = fixed_line(done, name, method, d, s["fab"]) if s else None
        fixed.append(f"{s['psnr'] - line:+.2f}" if s and line is not None else "-")
        r = control["scores"].get(d) if control else None
        random.append(f"{s['psnr'] - r['psnr']:+.2f}" if s and r else "-")
    return ", ".join(fixed), ", ".join(random)


def _plot(done: dict, name: str, datasets: list[str]) -> None:
    """docs/results/dynamic_<name>.png: PSNR against FAB and against BitOPs, per dataset."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install -e '.[report]')")
        return
    fig, axes = plt.subplots(len(datasets), 2, figsize=(11, 4.2 * len(datasets)), squeeze=False)
    styles = {"fixed": ("s", "black"), "adaptive": ("o", "tab:blue"), "random": ("x", "tab:red")}
    styles.update({"paper": ("v", "tab:purple")})
    for row, dataset in enumerate(datasets):
        for col, field in enumerate(("fab", "bitops_g")):
            ax = axes[row][col]
            for key, cell in sorted(done.items()):
                if not key.startswith(name + "|") or key.endswith("|fp") or dataset not in cell["scores"]:
                    continue
                _, method, variant = key.split("|")
                kind = (
                    "fixed"
                    if variant.startswith("fixed")
                    else "random"
                    if variant.startswith("random")
                    else "paper"
                    if variant == "paper" or variant.startswith("gbc")
                    else "adaptive"
                )
                marker, colour = styles[kind]
                s = cell["scores"][dataset]
                ax.scatter(s[field], s["psnr"], marker=marker, color=colour)
                ax.annotate(f"{method.replace('granular-dq', 'gdq')} {variant}", (s[field], s["psnr"]), fontsize=6)
            ax.set_xlabel("FAB (mean activation bit)" if field == "fab" else "BitOPs (G, 1280x720 output)")
            ax.set_ylabel(f"{dataset} PSNR (dB)")
            ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker=m, color=c, linestyle="", label=k) for k, (m, c) in styles.items()]
    fig.suptitle(f"{name} x4: adaptive bits against fixed bits and random allocations", y=0.995)
    fig.legend(handles=handles, loc="upper center", ncol=4, bbox_to_anchor=(0.5, 0.975))
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(RESULTS / f"dynamic_{name}.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    run_main(main)
