"""Calibration wall time of fixed-bit PTQ cells measured the way a user runs them: every core, nothing else running.

The PTQ tables (ptq_table.py) run cells on one thread beside other jobs, so their seconds are upper bounds. This
script runs the named cells one at a time with torch's default thread count and records the calibration seconds
with the Set5/Set14 PSNR and drop of the same run (thread count changes float reductions, hence the PSNR a little).

    python benchmarks/calibration_time.py --assets ../shared/assets [--only imdn:4:recon:channel+part,...]

Default cells: recon with per-channel weights and per-part input grids, IMDN/PAN/CARN-M at W4A4 and W2A2 and
LMLT-Tiny at W4A4 (the issue-15 targets; ESWT's 600-step cell takes over an hour and is left to ptq_table.py).

Start it only on an idle machine: a second torch process on the same cores slows both several-fold.
Results: docs/results/calibration_time_cpu.json (one entry per cell, replaced on a re-run) and
docs/results/calibration_time_cpu.md.
"""

from __future__ import annotations

import argparse
from datetime import datetime, timezone

from common import RESULTS, fp_scores, header, load_json, run_main, update_json
from ptq_table import SCALE, cell_key, parse_cells, run_cell

DEFAULT_CELLS = ",".join(
    [f"{name}:{bits}:recon:channel+part" for bits in (4, 2) for name in ("imdn", "pan", "carn-m")]
    + ["lmlt-tiny:4:recon:channel+part"]
)
DATASETS = ["Set5", "Set14"]
STORE = RESULTS / "calibration_time_cpu.json"
BUDGET_SECONDS = 600  # issue 15: each calibration within 10 minutes on 2 cores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", default=None)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--only", default=DEFAULT_CELLS, help="comma list of name:bits:method:granularity cells")
    parser.add_argument("--table-only", action="store_true", help="write the table from the results file")
    args = parser.parse_args()
    for name, bits, method, gran in [] if args.table_only else parse_cells(args.only):
        cell = run_cell(name, bits, method, gran, args.preset, args.assets, DATASETS)
        cell["fp"] = fp_scores(name, SCALE, DATASETS, args.assets)
        cell["date"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        update_json(STORE, cell_key(name, bits, method, gran, args.preset), cell)
        print(f"{name} W{bits}A{bits} {method} {gran}: calib {cell['calib_seconds']:.0f} s", flush=True)
    write_table(load_json(STORE))


def write_table(done: dict) -> None:
    """docs/results/calibration_time_cpu.md: seconds against the 10-minute budget, with the run's quality."""
    lines = [
        header("Calibration wall time on all cores, nothing else running (x4, BasicSR convention)"),
        "",
        "Seconds: the calibration as the checkpoint records it; wall: quantize call including start-up and "
        "calibration-image loading. PSNR from the same run, drop = PSNR - FP. Each cell's machine line records its "
        "thread count and the last column the day it ran. The same machine's speed drifts from day to day (the same "
        "reference calibration took 40 to 82 s on different days; docs/quantization.md), so compare rows of one "
        "date.",
        "",
        "| network | bits | method | granularity | calib s | wall s | <= 10 min | Set5 (drop) | Set14 (drop) "
        "| machine | run |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(done):
        name, bits, method, gran, _ = key.split("|")
        cell = done[key]
        scores = [
            f"{cell['scores'][ds]['psnr']:.2f} ({cell['scores'][ds]['psnr'] - cell['fp'][ds]['psnr']:+.2f})"
            for ds in DATASETS
        ]
        within = "yes" if cell["calib_seconds"] <= BUDGET_SECONDS else "no"
        lines.append(
            f"| {name} | {bits} | {method} | {gran} | {cell['calib_seconds']:.0f} | {cell['wall_seconds']:.0f} "
            f"| {within} | {' | '.join(scores)} | {cell['machine']} | {cell.get('date', '-')} |"
        )
    text = "\n".join(lines) + "\n"
    (RESULTS / "calibration_time_cpu.md").write_text(text)
    print(text)


if __name__ == "__main__":
    run_main(main)
