"""Shared helpers for benchmark scripts: machine description and result files with their command."""

from __future__ import annotations

import fcntl
import json
import os
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

from srquant.errors import SrquantError
from srquant.runtime import cpu_name, tune_allocator

tune_allocator()  # benchmarks measure the same process settings the CLI uses

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"


def machine() -> str:
    """One line naming the CPU, core count, torch build and thread count the numbers were measured with."""
    return f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def command() -> str:
    """The command line that ran this benchmark."""
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    return "python " + " ".join([str(shown)] + sys.argv[1:])


def header(title: str, produced_by: str | None = None, machine_line: str | None = None) -> str:
    """Markdown header recording what, where, when and how a results table was produced; `machine_line` replaces
    this process's machine line for tables assembled from cells that each recorded their own."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    where = machine_line or machine()
    return f"# {title}\n\n- command: `{produced_by or command()}`\n- machine: {where}\n- date: {stamp}\n"


def run_main(main: Callable[[], None]) -> None:
    """Run a benchmark's `main`, ending a library error (missing asset, bad checkpoint) in one line, as the CLI does."""
    try:
        main()
    except SrquantError as err:
        raise SystemExit(f"{Path(sys.argv[0]).name}: error: {err}") from None


def load_json(path: Path) -> dict:
    """Read a partial-results JSON file (empty when absent), so long benchmarks can resume."""
    return json.loads(path.read_text()) if path.is_file() else {}


def update_json(path: Path, key: str, value: object) -> dict:
    """Add one finished cell to a results file under an exclusive lock (re-reading it first), so parallel
    workers never overwrite each other's cells; returns the merged results."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = load_json(path)
        data[key] = value
        save_json(path, data)
    return data


def save_json(path: Path, data: dict) -> None:
    """Write results atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # one per process: parallel workers write the same file
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def fp_scores(name: str, scale: int, datasets: list[str], assets: str | None) -> dict[str, dict[str, float]]:
    """Whole-image FP PSNR/SSIM per dataset from the zoo benchmark's results when present, else measured here."""
    from srquant import evaluate, load_model

    zoo = load_json(RESULTS / "zoo_fp.json")
    scores = {ds: zoo[f"{name}|{scale}|{ds}"] for ds in datasets if f"{name}|{scale}|{ds}" in zoo}
    missing = [ds for ds in datasets if ds not in scores]
    if missing:
        model = load_model(name, scale, assets)
        for r in evaluate(model, missing, scale, ["basicsr"], assets, progress=False):
            scores[r.dataset] = {"psnr": r.psnr, "ssim": r.ssim}
    return scores
