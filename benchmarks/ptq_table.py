"""Fixed-bit PTQ methods on the shipped networks (x4): PSNR/SSIM on the four benchmarks, drop from FP, calibration
wall time, size and BitOPs, per weight granularity. Resumable: finished cells live in docs/results/ptq.json and
are skipped on a re-run; tables are written from whatever cells exist.

    python benchmarks/ptq_table.py --assets ../shared/assets --plan granularity   # per tensor vs per channel
    python benchmarks/ptq_table.py --assets ../shared/assets --only imdn:4:dobi:channel --threads 1
    python benchmarks/ptq_table.py --assets ../shared/assets --plan parts     # per-part input grids
    python benchmarks/ptq_table.py --table-only
    python benchmarks/ptq_table.py --assets ../shared/assets --only imdn:4:recon:channel+part --checkpoints /tmp/ptq
    python benchmarks/ptq_table.py --assets ../shared/assets --only imdn:4:dobi:channel --rerun   # replace a cell

With `--checkpoints DIR` every cell run also writes its quantized checkpoint to DIR, and a stored cell that lacks some
of the requested `--datasets` but has its checkpoint there is evaluated on the missing sets only (no recalibration).

A cell is `network:bits:method:granularity` (bits b means WbAb); granularity `channel+part` is per-channel weights
with per-part input grids for the fusion convs (`act_granularity="part"`). Calibration images:
<assets>/calibration/train291 (never a benchmark image).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import RESULTS, fp_scores, header, load_json, machine, run_main, update_json

from srquant import api, evaluate, load_quantized
from srquant.methods.registry import get_method
from srquant.quant.accounting import model_cost

SCALE = 4
DATASETS = ["Set5", "Set14", "B100", "Urban100"]
NETWORKS = ("imdn", "pan", "carn-m", "eswt", "lmlt-tiny")
METHODS = ("minmax", "percentile", "dbdc-pac", "dobi", "2dquant", "recon")  # the expected order, worst first
PLANS = {
    # Does per-channel weight quantization help? Both granularities, DOBI and 2DQuant at W4A4, DOBI at W8A8.
    "granularity": [
        (name, bits, method, gran)
        for name in NETWORKS
        for bits, method in ((4, "dobi"), (4, "2dquant"), (8, "dobi"))
        for gran in ("tensor", "channel")
    ],
    # Every fixed-bit method at 4, 3 and 2 bits, per-channel weights (2DQuant's Table 3 and srquant's recon).
    "methods": [(name, bits, method, "channel") for bits in (4, 2, 3) for name in NETWORKS for method in METHODS],
    # Per-part input grids for the concatenations the fusion convs read, against one grid per input.
    "parts": [
        (name, bits, method, "channel+part")
        for name in ("carn-m", "imdn", "pan")
        for bits in (3, 4, 2)
        for method in ("dobi", "2dquant", "recon")
    ],
}
# 2DQuant Table 3, SwinIR-light x4, Set5 drop from FP (32.45 dB): the published order, for scale.
PAPER_SET5_DROP = {
    4: {"minmax": -3.82, "percentile": -1.81, "dbdc-pac": -1.71, "dobi": -1.35, "2dquant": -0.68},
    3: {"minmax": -13.04, "percentile": -4.90, "dbdc-pac": -4.54, "dobi": -2.86, "2dquant": -1.55},
    2: {"minmax": -8.49, "percentile": -9.42, "dbdc-pac": -7.44, "dobi": -3.63, "2dquant": -2.92},
}
STORE = RESULTS / "ptq.json"
# The config fields that set how long a method trains: a stored cell whose values differ from its preset's was run
# with an earlier schedule; it is marked in the tables and run again by a command that names it.
SCHEDULE_FIELDS = ("iterations", "calib_count", "batch_size", "dqc_iterations", "e2e_iterations")


CELL_MACHINES = "each cell's own (CPU, cores, torch, threads), in `machine` of docs/results/ptq.json"


def cell_key(name: str, bits: int, method: str, granularity: str, preset: str) -> str:
    """The results-file key of one cell."""
    return f"{name}|W{bits}A{bits}|{method}|{granularity}|{preset}"


def checkpoint_path(folder: Path, key: str) -> Path:
    """Where `--checkpoints` keeps one cell's quantized model."""
    return folder / (key.replace("|", "_").replace("+", "-") + ".pt")


def run_cell(
    name: str,
    bits: int,
    method: str,
    granularity: str,
    preset: str,
    assets: str | None,
    datasets: list[str],
    checkpoint: Path | None = None,
) -> dict:
    """Quantize one network by one method and evaluate it on the given benchmarks (saving it when asked)."""
    start = time.perf_counter()
    weights, _, inputs = granularity.partition("+")
    result = api.quantize(
        name,
        SCALE,
        method,
        bits,
        bits,
        preset=preset,
        assets=assets,
        device="cpu",
        weight_granularity=weights,
        act_granularity=inputs or "tensor",
    )
    if checkpoint is not None:
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        result.save(checkpoint)
    cost = model_cost(result.network, SCALE)
    results = evaluate(result.model, datasets, SCALE, ["basicsr"], assets, progress=False)
    return {
        "calib_seconds": result.calib_seconds,
        "wall_seconds": time.perf_counter() - start,
        "size_mb": cost.size_mb,
        "bitops_g": cost.bitops_g,
        "scores": {r.dataset: {"psnr": r.psnr, "ssim": r.ssim} for r in results},
        "quantized": result.report.summary(),
        "rollbacks": result.rollbacks,
        "machine": machine(),
        "schedule": {k: result.settings[k] for k in SCHEDULE_FIELDS if k in (result.settings or {})},
        "checkpoint": None if checkpoint is None else str(checkpoint),
    }


def add_datasets(cell: dict, checkpoint: Path, missing: list[str], assets: str | None) -> dict:
    """Evaluate a stored cell's checkpoint on the sets it lacks and merge the scores."""
    results = evaluate(load_quantized(checkpoint), missing, SCALE, ["basicsr"], assets, progress=False)
    scores = {**cell["scores"], **{r.dataset: {"psnr": r.psnr, "ssim": r.ssim} for r in results}}
    return {**cell, "scores": scores}


def outdated(cell: dict, method: str, preset: str) -> dict[str, object]:
    """The schedule fields in which a stored cell differs from the method's current preset (empty: current)."""
    current = get_method(method).config(preset)
    recorded = cell.get("schedule", {})
    return {k: v for k, v in recorded.items() if hasattr(current, k) and getattr(current, k) != v}


def mark(cell: dict, method: str, preset: str) -> str:
    """`†` after a cell run with an earlier schedule of its preset."""
    return "†" if outdated(cell, method, preset) else ""


OUTDATED_NOTE = (
    "† run with an earlier `{preset}` schedule of its method (recon: 300 steps per block, or 600 without the 300 "
    "end-to-end steps the preset now ends with; `schedule` in docs/results/ptq.json); naming the cell with `--only` "
    "runs it again."
)


def outdated_note(lines: list[str], preset: str) -> list[str]:
    """The `†` footnote, for a table that marks a cell."""
    return ["", OUTDATED_NOTE.format(preset=preset)] if any("†" in line for line in lines) else []


def parse_cells(text: str) -> list[tuple[str, int, str, str]]:
    """`name:bits:method:granularity,...` -> cells."""
    cells = []
    for item in text.split(","):
        name, bits, method, gran = item.split(":")
        cells.append((name, int(bits), method, gran))
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", default=None)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--plan", choices=sorted(PLANS), help="a named set of cells")
    parser.add_argument("--only", help="comma list of name:bits:method:granularity cells")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--datasets", default=",".join(DATASETS), help="comma list; missing sets show as - in the tables"
    )
    parser.add_argument("--table-only", action="store_true", help="write the tables from the results file")
    parser.add_argument("--rerun", action="store_true", help="run the named cells again even when stored")
    parser.add_argument(
        "--checkpoints", type=Path, help="folder for each run cell's checkpoint; fills missing sets from it"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    datasets = args.datasets.split(",")
    cells = parse_cells(args.only) if args.only else PLANS.get(args.plan or "", [])
    for name, bits, method, gran in [] if args.table_only else cells:
        if f"{name}|fp" not in load_json(STORE):
            update_json(STORE, f"{name}|fp", fp_scores(name, SCALE, DATASETS, args.assets))
        key = cell_key(name, bits, method, gran, args.preset)
        stored = load_json(STORE).get(key)
        saved = checkpoint_path(args.checkpoints, key) if args.checkpoints else None
        if stored is not None and not outdated(stored, method, args.preset) and not args.rerun:
            missing = [d for d in datasets if d not in stored["scores"]]
            own = saved is not None and saved.is_file() and stored.get("checkpoint") == str(saved)
            if missing and own:
                update_json(STORE, key, add_datasets(stored, saved, missing, args.assets))
                print(f"{key:<40} added {', '.join(missing)}", flush=True)
            elif missing:
                print(f"{key:<40} lacks {', '.join(missing)} and has no checkpoint to add them from: --rerun it")
            continue
        cell = run_cell(name, bits, method, gran, args.preset, args.assets, datasets, saved)
        update_json(STORE, key, cell)
        print(f"{key:<40} Set5 {cell['scores']['Set5']['psnr']:.2f}  calib {cell['calib_seconds']:.0f}s", flush=True)
    done = load_json(STORE)
    write_granularity_table(done, args.preset)
    write_methods_table(done, args.preset)
    write_parts_table(done, args.preset)


def write_parts_table(done: dict, preset: str) -> None:
    """docs/results/ptq_parts.md: one input grid per concatenated part against one per input, cell by cell."""
    command = f"python benchmarks/ptq_table.py --assets ../shared/assets --plan parts --preset {preset}"
    lines = [
        header(
            f"Per-part input grids for the fusion convs, x4, BasicSR convention, preset `{preset}`",
            command,
            CELL_MACHINES,
        )
    ]
    lines.append(
        "\nPer-channel weights in both columns. One grid: every layer input on one grid (the papers' choice, as in "
        "docs/results/ptq_cpu.md). Per part: each conv whose input concatenates several sources (the layouts' "
        "`input_parts`: CARN-M's cascade fusion convs, IMDN's c5, PAN's SCPA conv3, LMLT-Tiny's level fusion, "
        "ESWT's branch projection) gets one grid per part, and CARN-M's outer cascade fusion convs (c1-c3) and "
        "the transformers' feed-forward reducing convs (LMLT-Tiny's CCM 1x1 after GELU, ESWT's MLP fc2 after "
        "SiLU) one grid per input channel; every other "
        "input keeps one grid. Set5/Set14 PSNR with the drop from FP; calibration seconds of the per-part cell. "
        "The plan runs every cell on all four sets; most cells were run with `--only "
        "NETWORK:BITS:METHOD:channel+part --datasets Set5,Set14 --threads 1` beside one or two other jobs, so "
        "their calibration seconds are upper bounds. CARN-M's per-part cells were all run again alone with two "
        "threads after its outer fusion convs got per-channel grids (2026-12-01 afternoon and 12-02, when the "
        "same reference calibration ran 2.0x and 1.3x slower than on 12-01 morning; docs/quantization.md). "
        "The cells scored on all four sets ran alone (the last section).\n"
    )
    lines.append(
        "| network | bits | method | Set5 one grid | Set5 per part | gain | Set14 one grid | Set14 per part | gain "
        "| calib s |"
    )
    lines.append("|---" * 10 + "|")
    for name in NETWORKS:
        fp = done.get(f"{name}|fp")
        for bits in (4, 3, 2):
            for method in METHODS:
                one = done.get(cell_key(name, bits, method, "channel", preset))
                part = done.get(cell_key(name, bits, method, "channel+part", preset))
                if fp is None or part is None:
                    continue
                row = [name, f"W{bits}A{bits}", method]
                for dataset in ("Set5", "Set14"):
                    a = one["scores"].get(dataset, {}).get("psnr") if one else None
                    b = part["scores"].get(dataset, {}).get("psnr")
                    base = fp[dataset]["psnr"]
                    row.append("-" if a is None else f"{a:.2f} ({a - base:+.2f}){mark(one, method, preset)}")
                    row.append("-" if b is None else f"{b:.2f} ({b - base:+.2f}){mark(part, method, preset)}")
                    row.append("-" if a is None or b is None else f"{b - a:+.2f}")
                row.append(f"{part['calib_seconds']:.0f}")
                lines.append("| " + " | ".join(row) + " |")
    lines += outdated_note(lines, preset)
    lines += four_set_section(done, preset)
    (RESULTS / f"ptq_parts_{preset}.md").write_text("\n".join(lines) + "\n")


def four_set_section(done: dict, preset: str) -> list[str]:
    """The per-part cells that were scored on all four sets: PSNR/SSIM (drop), calibration time and threads."""
    rows = []
    for name in NETWORKS:
        fp = done.get(f"{name}|fp")
        for bits in (4, 3, 2):
            for method in METHODS:
                cell = done.get(cell_key(name, bits, method, "channel+part", preset))
                if fp is None or cell is None or not set(DATASETS) <= set(cell["scores"]):
                    continue
                threads = cell["machine"].rsplit(",", 1)[-1].strip()
                rows.append(
                    f"| {name} | W{bits}A{bits} | {method}{mark(cell, method, preset)} | {_scores(cell, fp)} | "
                    f"{cell['calib_seconds']:.0f} | {threads} |"
                )
    if not rows:
        return []
    cols = " | ".join(f"{d} PSNR/SSIM (drop)" for d in DATASETS)
    return [
        "",
        "## Per-part cells on all four sets",
        "",
        "Per-channel weights, per-part input grids, each cell run on its own with nothing else on the machine "
        "(`--only NETWORK:BITS:METHOD:channel+part --checkpoints DIR`, torch's threads as listed), so its "
        "calibration seconds are the ones a user waits.",
        "",
        f"| network | bits | method | {cols} | calib s | torch threads |",
        "|---" * (5 + len(DATASETS)) + "|",
        *rows,
    ]


def _scores(cell: dict, fp: dict) -> str:
    """`PSNR/SSIM (drop)` per dataset."""
    parts = []
    for d in DATASETS:
        got = cell["scores"].get(d)
        if got is None:
            parts.append("-")
            continue
        parts.append(f"{got['psnr']:.2f}/{got['ssim']:.4f} ({got['psnr'] - fp[d]['psnr']:+.2f})")
    return " | ".join(parts)


def ordering_report(done: dict, preset: str) -> list[str]:
    """Where the expected PSNR order (METHODS, worst first) fails, per network, bit-width and dataset."""
    lines = [f"## Ordering check (PSNR, {' < '.join(METHODS)})", ""]
    for bits in (4, 3, 2):
        for name in NETWORKS:
            cells = [done.get(cell_key(name, bits, m, "channel", preset)) for m in METHODS]
            if any(c is None for c in cells):
                continue
            broken = []
            sets = [d for d in DATASETS if all(d in c["scores"] for c in cells)]  # type: ignore[index]
            for d in sets:
                values = [c["scores"][d]["psnr"] for c in cells]  # type: ignore[index]
                for i in range(len(METHODS) - 1):
                    if not values[i] < values[i + 1]:
                        broken.append(f"{d}: {METHODS[i]} {values[i]:.2f} >= {METHODS[i + 1]} {values[i + 1]:.2f}")
            verdict = f"holds on {', '.join(sets)}" if not broken else "fails on " + "; ".join(broken)
            lines.append(f"- {name} W{bits}A{bits}: {verdict}")
    return lines


def write_methods_table(done: dict, preset: str) -> None:
    """docs/results/ptq_cpu.md: every fixed-bit method at W4A4, W3A3 and W2A2 with per-channel weights."""
    command = f"python benchmarks/ptq_table.py --assets ../shared/assets --plan methods --preset {preset}"
    lines = [header(f"Fixed-bit PTQ methods, x4, BasicSR convention, preset `{preset}`", command, CELL_MACHINES), ""]
    lines.append(
        "Per-channel weights for every method. Drop = PSNR - FP PSNR. Calibration seconds include loading the "
        "calibration images; each cell's torch threads and machine are in docs/results/ptq.json (`machine`), and "
        "cells that ran beside another job are upper bounds (docs/quantization.md gives idle timings). Size: "
        "parameter storage in decimal MB. The last column is 2DQuant's Table 3 Set5 drop for the same method on "
        "SwinIR-light x4, for scale. The command above runs every cell on all four sets; a cell with sets missing "
        "was run on its own (`--only NETWORK:BITS:METHOD:channel --datasets Set5,Set14 --threads 1`).\n"
    )
    cols = " | ".join(f"{d} PSNR/SSIM (drop)" for d in DATASETS)
    lines.append(f"| network | bits | method | {cols} | calib s | size MB | published Set5 drop |")
    lines.append("|---" * (6 + len(DATASETS)) + "|")
    for name in NETWORKS:
        fp = done.get(f"{name}|fp")
        if not fp:
            continue
        fp_cells = " | ".join(f"{fp[d]['psnr']:.2f}/{fp[d]['ssim']:.4f}" for d in DATASETS)
        lines.append(f"| {name} | FP | - | {fp_cells} | - | - | - |")
        for bits in (4, 3, 2):
            for method in METHODS:
                cell = done.get(cell_key(name, bits, method, "channel", preset))
                if cell is None:
                    continue
                paper = PAPER_SET5_DROP[bits].get(method)
                published = f"{paper:+.2f}" if paper is not None else "-"
                lines.append(
                    f"| {name} | W{bits}A{bits} | {method}{mark(cell, method, preset)} | {_scores(cell, fp)} | "
                    f"{cell['calib_seconds']:.0f} | "
                    f"{cell['size_mb']:.3f} | {published} |"
                )
    lines += [*outdated_note(lines, preset), "", *ordering_report(done, preset)]
    (RESULTS / f"ptq_{preset}.md").write_text("\n".join(lines) + "\n")


def write_granularity_table(done: dict, preset: str) -> None:
    """docs/results/ptq_granularity.md: per tensor against per channel, cell by cell, and what per channel gains."""
    command = f"python benchmarks/ptq_table.py --assets ../shared/assets --plan granularity --preset {preset}"
    lines = [
        header(
            f"Weight granularity: per tensor against per output channel, x4, preset `{preset}`", command, CELL_MACHINES
        ),
        "",
    ]
    lines.append(
        "PSNR/SSIM on the Y channel (BasicSR convention, whole images) with the drop from FP in brackets. "
        "Per tensor = one weight grid per layer (per slice for the fused q/k/v weights, as 2DQuant does); per "
        "channel = one grid per output channel. Activations are per tensor in both. Calibration seconds include "
        "loading the calibration images; cells ran one at a time with the torch threads named in each cell's "
        "`machine` (docs/results/ptq.json).\n"
    )
    cols = " | ".join(f"{d} PSNR/SSIM (drop)" for d in DATASETS)
    lines.append(f"| network | bits | method | weights | {cols} | calib s | size MB |")
    lines.append("|---" * (6 + len(DATASETS)) + "|")
    gains = []
    for name in NETWORKS:
        fp = done.get(f"{name}|fp")
        if not fp:
            continue
        lines.append(
            f"| {name} | FP | - | - | "
            + " | ".join(f"{fp[d]['psnr']:.2f}/{fp[d]['ssim']:.4f}" for d in DATASETS)
            + " | - | - |"
        )
        for bits in (4, 8):
            for method in ("dobi", "2dquant"):
                pair = {}
                for gran in ("tensor", "channel"):
                    cell = done.get(cell_key(name, bits, method, gran, preset))
                    if cell is None:
                        continue
                    pair[gran] = cell
                    lines.append(
                        f"| {name} | W{bits}A{bits} | {method} | per {gran} | {_scores(cell, fp)} | "
                        f"{cell['calib_seconds']:.0f} | {cell['size_mb']:.3f} |"
                    )
                if len(pair) == 2:
                    delta = [
                        pair["channel"]["scores"][d]["psnr"] - pair["tensor"]["scores"][d]["psnr"]
                        if d in pair["channel"]["scores"] and d in pair["tensor"]["scores"]
                        else None
                        for d in DATASETS
                    ]
                    gains.append((name, bits, method, delta))
    if gains:
        lines += ["", "## What per-channel weights gain (PSNR, per channel minus per tensor)", ""]
        lines.append("| network | bits | method | " + " | ".join(DATASETS) + " |")
        lines.append("|---" * (3 + len(DATASETS)) + "|")
        for name, bits, method, delta in gains:
            shown = " | ".join("-" if v is None else f"{v:+.2f}" for v in delta)
            lines.append(f"| {name} | W{bits}A{bits} | {method} | " + shown + " |")
        worse = [
            (n, b, m, d)
            for n, b, m, delta in gains
            for d, v in zip(DATASETS, delta, strict=True)
            if b == 4 and v is not None and v <= 0
        ]
        lines.append("")
        lines.append(
            "Every W4A4 cell improves with per-channel weights."
            if not worse
            else "W4A4 cells that do not improve: " + ", ".join(f"{n} {m} {d}" for n, _, m, d in worse) + "."
        )
    out = RESULTS / "ptq_granularity.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    run_main(main)
