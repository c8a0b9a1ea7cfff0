"""How close to lossless is the integer-deploy recipe? IMDN, PAN and CARN-M x4 quantized with `--deploy
onnxruntime` (W7A8 everywhere, symmetric per-channel weights, simulated 8-bit outputs and 8-bit tensors between
layers) by each calibration method; Set5 PSNR of the fake-quant model against FP, and of the exported integer
graph for every method.

    python benchmarks/deploy_quality.py --assets ../shared/assets [--networks imdn,pan,carn-m]
        [--methods minmax,percentile,dobi,2dquant,recon,minmax+bc] [--threads 1] [--table-only] [--rerun]

`M+bc` is method M followed by bias correction (`--bias-correction`; minmax, percentile, dobi and recon).

Resumable: cells live in docs/results/deploy_quality.json (`--rerun` replaces the named ones); writes
docs/results/deploy_quality.md. Speed is method-independent (the same graph) and lives in docs/results/speed_cpu.md.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from common import RESULTS, fp_scores, header, load_json, run_main, update_json
from ptq_table import SCHEDULE_FIELDS

from srquant import api, evaluate
from srquant.deploy.ort_runtime import OrtUpscaler

SCALE = 4
STORE = RESULTS / "deploy_quality.json"
TARGET_DB = 0.03
NETWORKS = ("imdn", "pan", "carn-m")
METHODS = ("minmax", "percentile", "dobi", "2dquant", "recon", "minmax+bc", "percentile+bc", "dobi+bc", "recon+bc")
"""The table's rows, in order; a cell not in the results file is left out."""


def run_cell(name: str, method: str, assets: str | None) -> dict:
    """Quantize with the deploy recipe, score the fake-quant model, export and score the integer graph. A method
    named `M+bc` is M followed by bias correction."""
    base, corrected = method.removesuffix("+bc"), method.endswith("+bc")
    extra = {"bias_correction": True} if corrected else {}
    with tempfile.TemporaryDirectory(prefix="srquant-deploy-") as tmp:
        ckpt, graph_path = Path(tmp) / "q.pt", Path(tmp) / "q.onnx"
        result = api.quantize(
            name, SCALE, base, 8, 8, assets=assets, device="cpu", deploy="onnxruntime", output=ckpt, **extra
        )
        fake = evaluate(result.model, ["Set5"], SCALE, ["basicsr"], assets, progress=False)[0]
        api.export_quantized(ckpt, graph_path, assets=assets)
        graph = OrtUpscaler(graph_path, SCALE, torch.get_num_threads())
        integer = evaluate(graph, ["Set5"], SCALE, ["basicsr"], assets, progress=False)[0]
    return {
        "fake_psnr": fake.psnr,
        "integer_psnr": integer.psnr,
        "calib_seconds": result.calib_seconds,
        "spec": f"W{result.spec.w_bits}A{result.spec.a_bits}",
        "quantized": result.report.summary(),
        "schedule": {k: result.settings[k] for k in SCHEDULE_FIELDS if k in (result.settings or {})},
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", default=None)
    parser.add_argument("--networks", default=",".join(NETWORKS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--threads", type=int)
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--rerun", action="store_true", help="run the named cells again, replacing stored ones")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    networks, methods = args.networks.split(","), args.methods.split(",")
    unknown = sorted({*networks} - {*NETWORKS}) + sorted({*methods} - {*METHODS})
    if unknown:  # a cell the table has no row for would be computed and never shown
        parser.error(
            f"not in the table: {', '.join(unknown)} (networks {', '.join(NETWORKS)}; methods {', '.join(METHODS)})"
        )
    for name in [] if args.table_only else networks:
        if f"{name}|fp" not in load_json(STORE):
            update_json(STORE, f"{name}|fp", fp_scores(name, SCALE, ["Set5"], args.assets))
        for method in methods:
            key = f"{name}|{method}"
            if key in load_json(STORE) and not args.rerun:
                continue
            cell = run_cell(name, method, args.assets)
            update_json(STORE, key, cell)
            print(f"{key:<20} fake {cell['fake_psnr']:.3f} integer {cell['integer_psnr']:.3f}", flush=True)
    write_table(load_json(STORE))  # every stored cell: a run of a few cells keeps the others in the table


def write_table(done: dict) -> None:
    """docs/results/deploy_quality.md: drops per method, the best per network, against the 0.03 dB target."""
    command = "python benchmarks/deploy_quality.py --assets ../shared/assets"
    lines = [header("The integer-deploy recipe (W7A8, `--deploy onnxruntime`): Set5 drop per calibration", command)]
    lines.append(
        "\nBasicSR convention. Fake-quant = the simulated model; integer = its exported ONNX graph run by "
        "onnxruntime's int8 kernels. Drop = PSNR - FP PSNR. Calibration seconds: one torch thread, beside other "
        f"jobs (upper bounds). Target: within {TARGET_DB} dB of FP.\n"
    )
    lines.append("| network | FP | method | fake-quant (drop) | integer (drop) | integer - fake | calib s |")
    lines.append("|---|---|---|---|---|---|---|")
    verdicts = []
    for name in NETWORKS:
        fp = done.get(f"{name}|fp", {}).get("Set5", {}).get("psnr")
        if fp is None:
            continue
        best = None
        for method in METHODS:
            cell = done.get(f"{name}|{method}")
            if cell is None:
                continue
            fake, integer = cell["fake_psnr"], cell["integer_psnr"]
            lines.append(
                f"| {name} | {fp:.3f} | {method} | {fake:.3f} ({fake - fp:+.3f}) | {integer:.3f} ({integer - fp:+.3f})"
                f" | {integer - fake:+.4f} | {cell['calib_seconds']:.0f} |"
            )
            if best is None or integer > best[1]:
                best = (method, integer)
        if best:
            met = "meets" if best[1] - fp >= -TARGET_DB else "misses"
            verdicts.append(f"- {name}: best integer graph {best[0]}, {best[1] - fp:+.3f} dB: {met} the target.")
    lines += ["", *verdicts]
    (RESULTS / "deploy_quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    run_main(main)
