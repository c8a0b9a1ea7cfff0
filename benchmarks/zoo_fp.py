"""Evaluate every shipped pretrained network at every scale on the four benchmarks (BasicSR convention)
and compare with the numbers the asset README gives. Resumable: finished (model, scale, set) cells are kept
in docs/results/zoo_fp.json and skipped on a re-run.

    python benchmarks/zoo_fp.py --assets ../shared/assets [--models imdn,pan] [--datasets Set5,Set14]
"""

from __future__ import annotations

import argparse

from common import RESULTS, header, load_json, run_main, save_json

from srquant import evaluate, load_model
from srquant.data.benchmark import BenchmarkSet
from srquant.models.registry import REGISTRY

DATASETS = ["Set5", "Set14", "B100", "Urban100"]
PSNR_TOL, SSIM_TOL = 0.01, 0.0005


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--assets", default=None)
    parser.add_argument("--models", default=None, help="comma list (default: every shipped network)")
    parser.add_argument("--datasets", default=",".join(DATASETS))
    args = parser.parse_args()
    datasets = args.datasets.split(",")
    names = args.models.split(",") if args.models else [n for n, e in REGISTRY.items() if e.checkpoints]
    store = RESULTS / "zoo_fp.json"
    done = load_json(store)
    for name in names:
        entry = REGISTRY[name]
        for scale in entry.scales:
            try:
                model = load_model(name, scale, args.assets)
            except Exception as err:  # a network whose weights are absent is reported, not fatal
                print(f"skip {name} x{scale}: {err}")
                continue
            for ds in datasets:
                key = f"{name}|{scale}|{ds}"
                if key in done:
                    continue
                bench = BenchmarkSet.from_assets(ds, args.assets)
                (result,) = evaluate(model, [bench.name], scale, ["basicsr"], args.assets, progress=False)
                done[key] = {
                    "psnr": result.psnr,
                    "ssim": result.ssim,
                    "images": result.images,
                    "seconds": result.seconds,
                }
                save_json(store, done)
                print(
                    f"{name:<10} x{scale} {ds:<9} {result.psnr:.4f} {result.ssim:.4f} {result.seconds:.0f}s",
                    flush=True,
                )
    write_table(done, names, datasets)


def write_table(done: dict, names: list[str], datasets: list[str]) -> None:
    """Markdown table: measured PSNR/SSIM, the README's reference, and whether it is within tolerance."""
    lines = [header("FP reproduction of the shipped networks (BasicSR convention, whole images)"), ""]
    lines.append(f"Tolerance: {PSNR_TOL} dB PSNR, {SSIM_TOL} SSIM against `shared/assets/README.md`.\n")
    lines.append("| model | scale | " + " | ".join(datasets) + " |")
    lines.append("|---|---|" + "---|" * len(datasets))
    checked = failed = 0
    absent = [n for n in names if not any(k.startswith(f"{n}|") for k in done)]
    for name in names:
        entry = REGISTRY[name]
        if name in absent:
            continue
        for scale in entry.scales:
            ckpt = entry.checkpoint(scale)
            cells = []
            for ds in datasets:
                got = done.get(f"{name}|{scale}|{ds}")
                if got is None:
                    cells.append("-")
                    continue
                cell = f"{got['psnr']:.2f}/{got['ssim']:.4f}"
                ref = ckpt.reference.get(ds) if ckpt else None
                if ref:
                    ok = abs(got["psnr"] - ref[0]) <= PSNR_TOL and abs(got["ssim"] - ref[1]) <= SSIM_TOL
                    checked += 1
                    failed += not ok
                    cell += f" (ref {ref[0]:.2f}/{ref[1]:.4f} {'ok' if ok else 'MISS'})"
                cells.append(cell)
            lines.append(f"| {name} | x{scale} | " + " | ".join(cells) + " |")
    lines.append(f"\n{checked - failed} of {checked} reference numbers reproduced within tolerance.")
    if absent:
        lines.append(f"Not evaluated (weights not available in the asset directory): {', '.join(absent)}.")
    seconds = sum(v["seconds"] for v in done.values())
    lines.append(f"Total inference + scoring time: {seconds / 60:.1f} min.")
    out = RESULTS / "zoo_fp.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    run_main(main)
