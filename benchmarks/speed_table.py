"""Real integer inference on this CPU: onnxruntime int8 (QDQ) against its fastest FP32 setting; checkpoint sizes.

    python benchmarks/speed_table.py --assets ../shared/assets [--threads 2] [--runs 10] [--size 256x256]
        [--only speed,sizes,profile,pt2e]

Speed: every shipped CNN at x4 and the transformers, quantized by MinMax with the deploy recipe
(`--deploy onnxruntime`: W7A8 everywhere, head and tail too, symmetric per-channel weights, simulated 8-bit
outputs, the tensors between layers at 8 bits where the network has glue taps), and once with the layers only
(no glue, float attention matmuls: exported inexact, `--allow-inexact`), exported with `srquant export`, timed
with `srquant bench-speed` (FP32 as exported and with the exact layout rewrites, each at onnxruntime's
"extended" and "all" levels, the fastest counts; all graphs interleaved in one fresh process; median of
--runs), Set5 PSNR of the integer graph against the fake-quant model.
Sizes: the float checkpoint against packed 8/4/2-bit checkpoints (MinMax, default layers). Profile: time per
operator type of the integer and float graphs (why a network gains or not). PT2E: PyTorch's x86 Inductor int8
flow against eager, channels-last and compiled FP32 on IMDN (the candidate second backend).
Run it on an idle machine: the numbers are wall-clock times.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from common import RESULTS, header, load_json, run_main, update_json

from srquant import api
from srquant.deploy.onnx_export import export_onnx
from srquant.deploy.speed import fp32_graphs, parse_size
from srquant.errors import SrquantError
from srquant.methods.pipeline import quantize_model
from srquant.models.registry import build_model, get_entry
from srquant.quant.quantize import GLUE_HOOK_SUFFIX, MATMUL_HOOKS
from srquant.quant.spec import QuantSpec

SCALE = 4
CNNS = ("imdn", "pan", "carn-m")
TRANSFORMERS = ("eswt", "lmlt-tiny")
OUT = RESULTS / "speed_cpu.json"


RECIPES = {"speed": "layers only", "speed-glue": "+ integer glue", "speed-matmul": "+ attention matmuls"}
"""Cell prefix -> row label: convs / linear layers only (an ablation: exported inexact); with the tensors between
them (CNNs with glue taps: the deploy recipe); with the attention matmuls' operands (transformers: the deploy
recipe)."""
INEXACT = {"speed"}  # recipes that leave float between the integer kernels: exported with allow_inexact


def has_hooks(name: str, prefix: str) -> bool:
    """True if the architecture has the taps a recipe quantizes: `*_glue` tensors, or attention-matmul hooks."""
    names = [n for n, _ in build_model(name, SCALE, tiny=True).named_modules()]
    if prefix == "speed-glue":
        return any(n.endswith(GLUE_HOOK_SUFFIX) for n in names)
    if prefix == "speed-matmul":
        return any(n.rpartition(".")[2] in MATMUL_HOOKS for n in names)
    return True


def quantize_w7a8(name: str, assets: str, folder: Path, glue: bool = False, matmul: bool = False) -> Path:
    """The deploy recipe (`--deploy onnxruntime`: W7A8 everywhere, symmetric per-channel weights, simulated integer
    outputs) by MinMax; the tensors between layers quantized only with `glue`, the attention matmuls' operands
    only with `matmul` (float otherwise, `--no-matmul`)."""
    model = api.load_model(name, SCALE, assets)
    fields = {"weight_granularity": "channel", "matmul": matmul}
    w_bits, fields = api.deploy_recipe("onnxruntime", model, 8, 8, fields)
    spec = QuantSpec(w_bits, 8, **{**fields, "glue_bits": fields["glue_bits"] if glue else None})
    root = Path(assets)
    result = quantize_model(
        model,
        get_entry(name).layout,
        "minmax",
        spec,
        root / "calibration" / "train291",
        datasets_root=root / "datasets",
    )
    path = folder / f"{name}_w{w_bits}a8{'_glue' if glue else ''}{'_matmul' if matmul else ''}.pt"
    result.save(path)
    return path


def run_speed(names: list[str], args: argparse.Namespace, folder: Path) -> None:
    """bench-speed for each network and recipe; one JSON cell each (`speed|NAME`, `speed-glue|NAME`)."""
    for name in names:
        for prefix in RECIPES:
            if not has_hooks(name, prefix):
                continue
            start = time.perf_counter()
            path = quantize_w7a8(name, args.assets, folder, prefix == "speed-glue", prefix == "speed-matmul")
            try:
                report = api.bench_speed(
                    path, args.size, args.threads, args.runs, args.assets, allow_inexact=prefix in INEXACT
                )
            except SrquantError as err:  # recorded: what the export cannot do yet is part of the result
                update_json(OUT, f"{prefix}|{name}", {"error": str(err)})
                print(f"{name:<10} not exported: {err}", flush=True)
                continue
            cell = report.to_json() | {"wall_seconds": time.perf_counter() - start}
            update_json(OUT, f"{prefix}|{name}", cell)
            print(
                f"{name:<10} {RECIPES[prefix]:<15} fp32 {report.fp32_ms:8.1f} ms ({report.fp32_setting}) int "
                f"{report.int_ms:8.1f} ms ({report.int_setting}) x{report.speedup:.2f}  Set5 {report.psnr_fake:.3f} -> "
                f"{report.psnr_int:.3f} ({report.psnr_delta_db:+.4f} dB)  peak {report.peak_mb:.0f}/"
                f"{report.fp32_peak_mb:.0f} MB",
                flush=True,
            )


def run_sizes(names: list[str], assets: str, folder: Path) -> None:
    """On-disk size of the float state dict and of packed 8/4/2-bit checkpoints (MinMax, default layers)."""
    for name in names:
        model = api.load_model(name, SCALE, assets)
        float_path = folder / f"{name}_float.pt"
        torch.save(model.state_dict(), float_path)
        cell: dict[str, object] = {"float_bytes": float_path.stat().st_size}
        for bits in (8, 4, 2):
            for full in (False, True):  # body only (papers' default), and head/tail at W8A8 too
                model = api.load_model(name, SCALE, assets)
                spec = QuantSpec(bits, bits, full=full)
                calib = Path(assets) / "calibration" / "train291"
                result = quantize_model(model, get_entry(name).layout, "minmax", spec, calib)
                key = f"w{bits}{'_full' if full else ''}"
                path = folder / f"{name}_{key}.pt"
                cell[f"{key}_bytes"] = result.save(path)
                cell[f"{key}_layers"] = result.report.summary()
        update_json(OUT, f"sizes|{name}", cell)
        print(name, {k: v for k, v in cell.items() if k.endswith("bytes")}, flush=True)


def op_profile(path: Path, size: tuple[int, int], threads: int, runs: int = 3) -> dict[str, float]:
    """Milliseconds per onnxruntime operator type (mean over runs) for one graph."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).random((1, 3, *size), dtype=np.float32)
        session.run(None, {"lr": x})
        for _ in range(runs):
            session.run(None, {"lr": x})
        events = json.loads(Path(session.end_profiling()).read_text())
    totals: collections.Counter[str] = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            totals[event["args"]["op_name"]] += event["dur"] / 1000.0 / (runs + 1)
    return dict(totals.most_common())


def run_profile(names: list[str], args: argparse.Namespace, folder: Path) -> None:
    """Where the time goes in the integer and float graphs of each network (and its integer-glue graph)."""
    for name in names:
        for prefix in RECIPES:
            if not has_hooks(name, prefix):
                continue
            glue = prefix == "speed-glue"
            recipe = quantize_w7a8(name, args.assets, folder, glue, prefix == "speed-matmul")
            model = api.load_quantized(recipe, "cpu")
            fixed = int(getattr(model, "pad_multiple", 1)) != 1
            try:
                size = args.size if fixed else None
                export_onnx(model, folder / f"{name}_int.onnx", None, size, allow_inexact=prefix in INEXACT)
            except SrquantError as err:
                print(f"{name}: no profile, not exported: {err}", flush=True)
                continue
            paths = {"int": folder / f"{name}_int.onnx"}
            if prefix == "speed":  # the float graphs are the same for every recipe
                graphs = fp32_graphs(model, folder, args.size if fixed else None)
                paths |= {kind: path for kind, (path, _) in graphs.items()}
            cell = {kind: op_profile(path, args.size, args.threads or 2) for kind, path in paths.items()}
            key = prefix.replace("speed", "profile") + f"|{name}"
            update_json(OUT, key, cell)
            print(key, {k: round(v) for k, v in list(cell["int"].items())[:6]}, flush=True)


def run_pt2e(args: argparse.Namespace) -> None:
    """PyTorch's PT2E int8 flow (x86 Inductor quantizer, torch.compile) against eager/channels-last/compiled FP32."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    from srquant.deploy.speed import median_latencies

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads or 2)
    model = api.load_model("imdn", SCALE, args.assets).eval()
    x = torch.rand(1, 3, *args.size)
    start = time.perf_counter()
    with torch.no_grad():
        compiled = torch.compile(model)
        compiled(x)
        exported = torch.export.export(model, (x,)).module()
        quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported, quantizer)
        prepared(x)  # observers see the timing input only: this measures speed, not PT2E's accuracy
        quantized = torch.compile(convert_pt2e(prepared))
        quantized(x)
        last = model.to(memory_format=torch.channels_last)
        x_last = x.contiguous(memory_format=torch.channels_last)
        runners = {
            "eager": lambda: model(x),
            "channels_last": lambda: last(x_last),
            "compiled": lambda: compiled(x),
            "pt2e_int8_compiled": lambda: quantized(x),
        }
        timings = median_latencies(runners, args.runs)
    cell = {"timings_ms": timings, "threads": torch.get_num_threads(), "setup_seconds": time.perf_counter() - start}
    update_json(OUT, "pt2e|imdn", cell)
    print("pt2e imdn", {k: round(v, 1) for k, v in timings.items()}, flush=True)


def table() -> str:
    """The markdown results."""
    data = load_json(OUT)
    produced_by = "python benchmarks/speed_table.py --assets ../shared/assets --threads 2 --runs 10"
    lines = [header("Real integer inference on CPU (onnxruntime)", produced_by), ""]
    lines.append(
        "Parts can be run alone with `--only speed,sizes,profile,pt2e`; this file was written from the stored "
        "cells (`--table-only`). Timings were taken on the otherwise idle machine, every setting once per round, in "
        "a fresh process that imports onnxruntime and numpy only (the IMDN PT2E probe runs in this process). Recipes, "
        "all MinMax at W7A8 with head and tail (`--deploy onnxruntime`: symmetric per-channel 7-bit weights, whose "
        "int8 codes stay within +-63 so onnxruntime's u8 x s8 kernels never saturate, simulated 8-bit outputs): "
        "`layers only` quantizes the convs and linear layers alone (`--no-matmul`, no glue; exported with "
        "`--allow-inexact`); `+ attention matmuls` also their operands (transformers); `+ integer glue` also "
        "quantizes the tensors between them that the architecture marks (`--glue-bits 8`; IMDN, PAN and CARN-M), so "
        "onnxruntime stays in uint8 between its kernels. In the integer graph a DequantizeLinear is moved past the "
        "ReLU / DepthToSpace / Split / nearest Resize op it feeds (exact; those run on uint8): `ops moved to uint8`. "
        "Layout rewrites (exact, docs/deploy.md) run wide grouped convs as one conv per group and pixel shuffles "
        "channels-last; the FP32 "
        "settings are the graph as exported (`fp32`) and the same graph with those rewrites (`fp32-layout16`, "
        "`fp32-layout32`: groups of at least 16 or 32 outputs split), each at onnxruntime's `extended` and `all` "
        "levels, and the fastest of them is the baseline.\n"
    )
    lines += [
        "## W7A8 integer vs the fastest FP32 setting (same runtime, LR 256x256, x4)",
        "",
        "| network | recipe | FP32 ms (setting) | int8 ms (setting) | speed-up | peak MB int / fp32 | "
        "Set5 fake-quant | Set5 integer | difference dB | integer convs | glue tensors | ops moved to uint8 | "
        "branched convs / NHWC shuffles |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in CNNS + TRANSFORMERS:
        for prefix, recipe in RECIPES.items():
            cell = data.get(f"{prefix}|{name}")
            if not cell:
                continue
            if "error" in cell:
                lines.append(f"| {name} | {recipe} | not exported: {cell['error']} |" + " |" * 10)
                continue
            export = cell["export"]
            lines.append(
                f"| {name} | {recipe} | {cell['fp32_ms']:.1f} ({cell['fp32_setting']}) | {cell['int_ms']:.1f} "
                f"({cell['int_setting']}) | {cell['speedup']:.2f}x | {cell['peak_mb']:.0f} / "
                f"{cell['fp32_peak_mb']:.0f} | {cell['psnr_fake']:.3f} | {cell['psnr_int']:.3f} | "
                f"{cell['psnr_delta_db']:+.4f} | "
                f"{export['quantized_convs']} | {len(export.get('glue', []))} | {len(export.get('uint8_ops', []))} | "
                f"{len(export.get('branched_convs', []))} / {len(export.get('nhwc_shuffles', []))} |"
            )
    pt2e = data.get("pt2e|imdn")
    if pt2e:
        lines += ["", "## PyTorch PT2E (x86 Inductor int8) on IMDN x4, same input", "", "| setting | ms |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in pt2e["timings_ms"].items()]
    lines += [
        "",
        "## On-disk checkpoint sizes (MinMax; KiB; packed codes for quantized weights, float for the rest)",
        "",
        "Body: the default layers (head, upsampler and tail float). Full: head, upsampler and tail at 8 bits too.",
        "The float file is the network's state dict saved by torch.save. CARN-M's one checkpoint also holds the",
        "x2 and x3 upsamplers, which an x4 model never runs and which stay float.",
        "",
        "| network | float | W8 body | W4 body | W2 body | W8 full | W4 full | W2 full | W4 full / float |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    keys = ("float", "w8", "w4", "w2", "w8_full", "w4_full", "w2_full")
    for name in CNNS + TRANSFORMERS:
        cell = data.get(f"sizes|{name}")
        if cell and all(f"{k}_bytes" in cell for k in keys):
            sizes = " | ".join(f"{cell[f'{k}_bytes'] / 1024:.0f}" for k in keys)
            lines.append(f"| {name} | {sizes} | {cell['w4_full_bytes'] / cell['float_bytes']:.2f} |")
    profiles = [name for name in CNNS + TRANSFORMERS if f"profile|{name}" in data]
    if profiles:
        lines += ["", "## Where the time goes (ms per operator type, 256x256, top 8)", ""]
        for name in profiles:
            fp32_kinds = [kind for kind in data.get(f"profile|{name}", {}) if kind.startswith("fp32")]
            for key, kind, label in (
                (f"profile|{name}", "int", "int"),
                (f"profile-glue|{name}", "int", "int + glue"),
                (f"profile-matmul|{name}", "int", "int + matmuls"),
                *((f"profile|{name}", kind, kind) for kind in fp32_kinds),
            ):
                if key not in data or kind not in data[key]:
                    continue
                ranked = sorted(data[key][kind].items(), key=lambda item: -item[1])  # the JSON sorts keys by name
                top = ", ".join(f"{op} {ms:.0f}" for op, ms in ranked[:8])
                lines.append(f"- {name} {label}: {top} (total {sum(data[key][kind].values()):.0f})")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", required=True)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--size", type=parse_size, default=(256, 256))
    parser.add_argument("--only", default="speed,sizes,profile,pt2e")
    parser.add_argument("--models", default=",".join(CNNS + TRANSFORMERS))
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    names = args.models.split(",")
    parts = set(args.only.split(","))
    with tempfile.TemporaryDirectory(prefix="srquant-speed-") as tmp:
        folder = Path(tmp)
        if not args.table_only:
            if "sizes" in parts:
                run_sizes(names, args.assets, folder)
            if "speed" in parts:
                run_speed(names, args, folder)
            if "profile" in parts:
                run_profile(names, args, folder)
            if "pt2e" in parts:
                run_pt2e(args)
    text = table()
    (RESULTS / "speed_cpu.md").write_text(text)
    print(text)


if __name__ == "__main__":
    run_main(main)
