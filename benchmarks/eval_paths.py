"""One checkpoint of every registered method, scored on Set5 three ways that must agree: `srquant eval --model`
(a fresh process), `srquant.load_quantized` + `srquant.evaluate` (this process), and, for the fixed-bit
deploy recipe, the exported integer ONNX graph run by onnxruntime.

    python benchmarks/eval_paths.py --assets ../shared/assets [--network imdn] [--threads 2] [--iterations 10]

The methods that train run `--iterations` steps (default 10: the three paths must agree whatever the schedule).

Writes docs/results/eval_paths.md (and .json). Checkpoints go to a temporary folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import RESULTS, header, run_main, save_json

import srquant
from srquant.deploy.ort_runtime import OrtUpscaler
from srquant.methods.registry import get_method, method_names

SCALE = 4
BITS = {"granular-dq": (8, 8)}  # Granular-DQ's activation bits come from its controller; 8-bit weights as the paper


def cli_psnr(checkpoint: Path, assets: str, out: Path) -> float:
    """Set5 PSNR printed by `srquant eval --model CHECKPOINT` in a fresh process."""
    argv = [sys.executable, "-m", "srquant", "eval", "--model", str(checkpoint), "--scale", str(SCALE)]
    argv += ["--datasets", "Set5", "--assets", assets, "--json", str(out), "--no-progress", "--device", "cpu"]
    # The same torch thread count as this process: a different split of a convolution's sums can move a value
    # across a quantization step, which would show as a difference between the paths that is not one.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    subprocess.run(argv, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.read_text())["results"][0]["psnr"]


def api_psnr(checkpoint: Path, assets: str) -> float:
    """Set5 PSNR of `srquant.load_quantized` + `srquant.evaluate`."""
    model = srquant.load_quantized(checkpoint, device="cpu")
    return srquant.evaluate(model, ["Set5"], SCALE, ["basicsr"], assets, progress=False)[0].psnr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", default="../shared/assets")
    parser.add_argument("--network", default="imdn")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--iterations", type=int, default=10, help="training steps of the methods that train")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="srquant-paths-") as tmp:
        folder = Path(tmp)
        cases = [(m, None) for m in method_names()] + [("minmax", "onnxruntime")]
        for method, deploy in cases:
            w, a = BITS.get(method, (8, 8) if deploy else (4, 4))
            ckpt = folder / f"{method}_{deploy or 'fake'}.pt"
            plugin = get_method(method)
            trains = "iterations" in {f.name for f in dataclasses.fields(plugin.config_type)}
            steps = {"iterations": args.iterations} if trains else {}
            result = srquant.quantize(
                args.network, SCALE, method, w, a, assets=args.assets, device="cpu", output=ckpt, deploy=deploy, **steps
            )
            row = {
                "method": method,
                "recipe": f"--deploy {deploy}" if deploy else f"W{w}A{a}",
                "dynamic": plugin.dynamic,
                "iterations": steps.get("iterations"),
                "cli": cli_psnr(ckpt, args.assets, folder / "eval.json"),
                "api": api_psnr(ckpt, args.assets),
                "quantized": result.report.summary(),
            }
            if deploy:
                onnx_path = folder / "q.onnx"
                srquant.export_quantized(ckpt, onnx_path, assets=args.assets)
                graph = OrtUpscaler(onnx_path, SCALE, torch.get_num_threads())
                row["integer"] = srquant.evaluate(graph, ["Set5"], SCALE, ["basicsr"], args.assets, progress=False)[
                    0
                ].psnr
            rows.append(row)
            print(row, flush=True)
    save_json(RESULTS / "eval_paths.json", {"network": args.network, "rows": rows})
    write_table(rows, args.network)


def write_table(rows: list[dict], network: str) -> None:
    """docs/results/eval_paths.md."""
    lines = [header(f"Set5 PSNR of one {network} x4 checkpoint per method, three ways", None), ""]
    lines.append(
        "`srquant eval --model` runs in a fresh process; the API column loads the same file with "
        "`srquant.load_quantized` and scores it with `srquant.evaluate`; the integer column runs the exported "
        "ONNX graph on onnxruntime's integer kernels (fixed-bit deploy recipe only). BasicSR convention.\n"
    )
    lines.append("| method | recipe | srquant eval | load_quantized + evaluate | integer graph | largest difference |")
    lines.append("|---|---|---|---|---|---|")
    for row in rows:
        values = [row["cli"], row["api"]] + ([row["integer"]] if "integer" in row else [])
        spread = max(values) - min(values)
        integer = f"{row['integer']:.4f}" if "integer" in row else "-"
        lines.append(
            f"| {row['method']} | {row['recipe']} | {row['cli']:.4f} | {row['api']:.4f} | {integer} | {spread:.4f} dB |"
        )
    out = RESULTS / "eval_paths.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    run_main(main)
