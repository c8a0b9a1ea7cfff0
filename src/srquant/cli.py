"""Command-line interface: parse arguments, call one API function, print. Bad input exits 2 with one line on stderr."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from srquant import api
from srquant.deploy.speed import parse_size
from srquant.errors import SrquantError
from srquant.evaluate import DatasetResult
from srquant.methods.registry import method_names, preset_names
from srquant.models.inference import DEFAULT_OVERLAP, check_tiling
from srquant.outputs import atomic_write_text, check_output
from srquant.runtime import tune_allocator


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _size(text: str) -> tuple[int, int]:
    try:
        return parse_size(text)
    except SrquantError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _comma_list(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def _add_device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (a CUDA GPU when there is one), cpu, cuda or cuda:N")


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}: {err.msg}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"channels\": 32}}', got {text!r}")
    return value


def _input_range(text: str) -> float:
    if text not in ("1", "255"):
        raise argparse.ArgumentTypeError("expected 1 ([0, 1] inputs) or 255 ([0, 255] inputs)")
    return float(text)


def _add_arch_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", help="your own network instead of --model: FILE.py:ClassName (with --weights)")
    parser.add_argument("--arch-kwargs", type=_json_object, help="JSON keyword arguments for --arch's class")
    parser.add_argument(
        "--input-range", type=_input_range, default=1.0, help="255 for a network trained on [0, 255] inputs"
    )


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="zoo model name (see `srquant models`) or a quantized .pt")
    _add_arch_args(parser)
    parser.add_argument("--scale", type=_positive_int, required=True, help="upscaling factor")
    parser.add_argument("--weights", help="load this checkpoint instead of the registry's (strictly)")
    parser.add_argument("--download", action="store_true", help="fetch a missing checkpoint (sha256-verified)")
    parser.add_argument("--tile", type=_positive_int, help="tiled inference with this LR tile size (at least 32)")
    parser.add_argument(
        "--tile-overlap",
        type=int,
        default=DEFAULT_OVERLAP,
        help=f"LR pixels two neighbouring tiles share (default {DEFAULT_OVERLAP}); --tile must be at least twice it",
    )
    _add_device_arg(parser)


def _add_assets_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--assets", help="asset directory with weights/ and datasets/ (default: $SRQUANT_ASSETS)")


def build_parser() -> argparse.ArgumentParser:
    """The `srquant` argument parser with its sub-commands."""
    parser = argparse.ArgumentParser(prog="srquant", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="print more notes")
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("eval", help="evaluate a model on benchmark sets (PSNR/SSIM on Y)")
    _add_model_args(ev)
    _add_assets_arg(ev)
    ev.add_argument("--datasets", type=_comma_list, default=["Set5", "Set14", "B100", "Urban100"])
    ev.add_argument("--convention", type=_comma_list, default=["basicsr"], help="basicsr, edsr, or both: basicsr,edsr")
    ev.add_argument("--json", type=Path, help="write the results to this JSON file")
    ev.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    ev.add_argument(
        "--bits-json",
        type=Path,
        help="dynamic-bit models: write each image's bits here (AdaBM layers, Granular-DQ patches)",
    )
    ev.add_argument(
        "--bitmap-dir", type=Path, help="Granular-DQ models: write a bit-map PNG per image under DIR/<dataset>"
    )
    ev.add_argument(
        "--compare-fp",
        action="store_true",
        help="a checkpoint of a zoo network: also score the network's published float weights and print the drop",
    )

    data = sub.add_parser("data", help="dataset utilities")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    lr = data_sub.add_parser("lr", help="write the MATLAB-bicubic LR images of a benchmark set")
    lr.add_argument("--dataset", required=True)
    lr.add_argument("--scale", type=_positive_int, required=True)
    lr.add_argument("--out", type=Path, required=True)
    _add_assets_arg(lr)

    up = sub.add_parser("upscale", help="super-resolve one image")
    up.add_argument("input", type=Path)
    up.add_argument("-o", "--output", type=Path, required=True)
    _add_model_args(up)
    _add_assets_arg(up)

    qz = sub.add_parser("quantize", help="quantize a zoo model and write a quantized checkpoint")
    qz.add_argument("--model", help="zoo model name (or --arch for your own network)")
    _add_arch_args(qz)
    qz.add_argument("--layers", type=_comma_list, help="regular expressions of the layers to quantize (the body)")
    qz.add_argument("--keep-fp", type=_comma_list, help="regular expressions of layers to leave in floating point")
    qz.add_argument("--scale", type=_positive_int, required=True)
    qz.add_argument("--method", required=True, choices=method_names(), help="see `srquant methods`")
    qz.add_argument("--wbits", type=_positive_int, required=True)
    qz.add_argument("--abits", type=_positive_int, required=True)
    qz.add_argument("--calib", type=Path, help="folder of training images (default: <assets>/calibration/train291)")
    qz.add_argument("-o", "--output", type=Path, required=True)
    qz.add_argument(
        "--preset",
        default="cpu",
        choices=preset_names(),
        help="the method's schedule: cpu (default), gpu, paper, code (see `srquant methods`)",
    )
    qz.add_argument("--full", action="store_true", help="also run head/upsampler/tail at W8A8 (fully quantized)")
    qz.add_argument(
        "--weight-quantizer",
        choices=("asymmetric", "symmetric"),
        default="asymmetric",
        help="weight grid of the fixed-bit methods (symmetric weights export to int8 exactly; default asymmetric); "
        "AdaBM always uses symmetric weights and Granular-DQ LSQ ones",
    )
    qz.add_argument(
        "--weight-granularity",
        choices=("tensor", "channel"),
        help="one weight grid per output channel or per tensor (default: the preset's; paper/code presets: tensor)",
    )
    qz.add_argument(
        "--act-granularity",
        choices=("tensor", "part"),
        default="tensor",
        help="part: one input grid per concatenated part of a fusion conv, and per channel where the layout says so "
        "(fixed-bit methods; not exportable)",
    )
    qz.add_argument(
        "--output-bits",
        type=_positive_int,
        help="also quantize each quantized layer's output at B bits, as integer kernels do (use 8 before export)",
    )
    qz.add_argument(
        "--glue-bits",
        type=_positive_int,
        help="with --output-bits: also quantize the tensors between layers (activations, concatenations, sums) "
        "at B bits, so an integer runtime stays in uint8 between its kernels (IMDN, PAN, CARN-M)",
    )
    qz.add_argument("--no-matmul", action="store_true", help="leave attention matmul operands in float (transformers)")
    qz.add_argument(
        "--deploy",
        choices=("onnxruntime",),
        help="the integer-export recipe: every layer W7A8 (int8 codes within +-63), symmetric per-channel weights, "
        "simulated outputs and uint8 tensors between layers; exact on every x86 CPU (docs/deploy.md)",
    )
    qz.add_argument(
        "--no-adapt",
        action="store_true",
        help="a dynamic method's fixed-bit twin (adabm, granular-dq): the same quantizers, calibration and schedule, "
        "every image and patch at --abits",
    )
    qz.add_argument(
        "--target-fab",
        type=float,
        help="granular-dq: the mean activation bit the patch bits must meet (a bit price calibrated after training)",
    )
    qz.add_argument(
        "--allocation",
        choices=("paper", "measured"),
        help="adabm, granular-dq: the paper's bit allocation, or srquant's from measured output errors per bit "
        "(default: the preset's)",
    )
    qz.add_argument("--percentile", type=float, help="percentile for --method percentile (default 99.99)")
    qz.add_argument(
        "--bias-correction",
        action="store_true",
        help="minmax, percentile, dobi, recon: afterwards shift each layer's bias by its mean output error",
    )
    qz.add_argument(
        "--iterations", type=int, help="override the preset's iterations (DQC; AdaBM per epoch; Granular-DQ)"
    )
    qz.add_argument("--batch-size", type=_positive_int, help="override the method's training batch size")
    qz.add_argument("--seed", type=int, help="override the preset's data seed")
    qz.add_argument("--weights", help="start from this float checkpoint instead of the registry's")
    qz.add_argument("--no-progress", action="store_true")
    _add_assets_arg(qz)
    _add_device_arg(qz)

    ex = sub.add_parser("export", help="write a fixed-bit A8 quantized checkpoint as an integer ONNX (QDQ) graph")
    ex.add_argument("--model", required=True, type=Path, help="quantized checkpoint (.pt from `srquant quantize`)")
    ex.add_argument("-o", "--output", required=True, type=Path, help="the .onnx file to write")
    ex.add_argument("--size", type=_size, help="LR HxW to export for (needed by networks that pad inside)")
    ex.add_argument("--calib", type=Path, help="images for output ranges the model does not simulate")
    ex.add_argument(
        "--allow-inexact", action="store_true", help="export even where the integer graph would differ or run slow"
    )
    _add_assets_arg(ex)

    bs = sub.add_parser("bench-speed", help="integer vs FP32 latency, peak memory and PSNR change on one runtime")
    bs.add_argument("--model", required=True, type=Path, help="quantized checkpoint (fixed-bit, A8)")
    bs.add_argument("--backend", default="onnxruntime", choices=("onnxruntime",), help="runtime (see docs/deploy.md)")
    bs.add_argument("--size", type=_size, default=(256, 256), help="LR HxW to time (default 256x256)")
    bs.add_argument("--threads", type=_positive_int, help="intra-op threads (default: all cores)")
    bs.add_argument("--runs", type=_positive_int, default=10, help="timed rounds; the median is reported")
    bs.add_argument("--psnr-dataset", default="Set5", help="benchmark for the PSNR change ('none' to skip)")
    bs.add_argument("--calib", type=Path, help="images for output ranges the model does not simulate")
    bs.add_argument("--json", type=Path, help="write the measurement here")
    bs.add_argument(
        "--allow-inexact", action="store_true", help="time the graph even where it would differ from the model"
    )
    _add_assets_arg(bs)

    models = sub.add_parser("models", help="list the model zoo and what is available locally")
    _add_assets_arg(models)
    sub.add_parser("methods", help="list the quantization methods and their presets")

    rp = sub.add_parser("report", help="an HTML page of scores, side-by-side crops, bit maps and plots")
    rp.add_argument(
        "--models", type=_comma_list, required=True, help="zoo names and quantized .pt files, comma-separated"
    )
    rp.add_argument("--scale", type=_positive_int, required=True)
    rp.add_argument("--datasets", type=_comma_list, default=["Set5", "Urban100"])
    rp.add_argument("-o", "--output", type=Path, required=True, help="folder for index.html and its images")
    rp.add_argument("--images", type=_comma_list, help="images to show (default: where the models lose most)")
    rp.add_argument("--per-dataset", type=_positive_int, default=2, help="images shown per dataset (default 2)")
    rp.add_argument("--error-maps", action="store_true", help="also show |SR - HR| of every crop")
    rp.add_argument("--no-progress", action="store_true")
    _add_assets_arg(rp)
    _add_device_arg(rp)
    return parser


def format_table(results: Sequence[DatasetResult]) -> str:
    """A plain-text table of results, each row labelled with its convention (FAB, BitOPs when measured)."""
    compared = any("drop_db" in r.extras for r in results)
    head = ("dataset", "conv", "PSNR", "SSIM", "images", "seconds", "FAB", "GBitOPs") + (
        ("FP PSNR", "drop") if compared else ()
    )
    form = "{:<10} {:<8} {:>8} {:>7} {:>6} {:>8} {:>6} {:>8}" + (" {:>8} {:>7}" if compared else "")
    lines = [form.format(*head)]
    for r in results:
        fab = f"{r.extras['fab']:.2f}" if "fab" in r.extras else "-"
        bops = f"{r.extras['bitops_g']:.2f}" if "bitops_g" in r.extras else "-"
        row = (r.dataset, r.convention, f"{r.psnr:.4f}", f"{r.ssim:.4f}", r.images, f"{r.seconds:.1f}", fab, bops)
        if compared:
            row += (f"{r.extras['fp_psnr']:.4f}", f"{r.extras['drop_db']:+.3f}")
        lines.append(form.format(*row))
    return "\n".join(lines)


def _json_output(path: Path | None, args: argparse.Namespace, *inputs: object) -> None:
    """Check a --json / --bits-json output before any work."""
    if path is not None:
        check_output(path, "json", [i for i in inputs if isinstance(i, str | Path)], api._asset_root(args.assets))


def _write_json(path: Path, record: object) -> None:
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


def _one_network(args: argparse.Namespace) -> None:
    """Exactly one of --model and --arch."""
    if (args.model is None) == (args.arch is None):
        raise SrquantError("name the network: --model NAME (or a quantized .pt), or --arch FILE.py:ClassName")


def cmd_eval(args: argparse.Namespace) -> int:
    _one_network(args)
    if args.json is not None and args.bits_json is not None and args.json.resolve() == args.bits_json.resolve():
        raise SrquantError("--json and --bits-json name the same file; give two")
    _json_output(args.json, args, args.model, args.weights)
    _json_output(args.bits_json, args, args.model, args.weights)
    check_tiling(args.tile, args.tile_overlap)
    evaluation = api.evaluate_model(
        args.model,
        args.scale,
        args.datasets,
        args.convention,
        args.assets,
        args.tile,
        args.weights,
        args.download,
        args.device,
        not args.no_progress,
        record_bits=args.bits_json is not None,
        bitmap_dir=args.bitmap_dir,
        overlap=args.tile_overlap,
        arch=args.arch,
        arch_kwargs=args.arch_kwargs,
        input_range=args.input_range,
        compare_fp=args.compare_fp,
    )
    print(f"{evaluation.label} x{args.scale}: {evaluation.description}, {evaluation.cost.size_mb:.3f} MB")
    print(format_table(evaluation.results))
    if args.bitmap_dir:
        print(f"wrote bit maps under {args.bitmap_dir}")
    if args.bits_json:
        _write_json(args.bits_json, evaluation.bits)
    if args.json:
        record = {
            "model": args.model,
            "scale": args.scale,
            "convention": ",".join(args.convention),
            "results": [r.summary() for r in evaluation.results],
        }
        _write_json(args.json, record)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    _one_network(args)
    overrides = {
        "percentile": args.percentile,
        "iterations": args.iterations,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "target_fab": args.target_fab,
        "allocation": args.allocation,
        "bias_correction": True if args.bias_correction else None,
    }
    result = api.quantize(
        args.model,
        args.scale,
        args.method,
        args.wbits,
        args.abits,
        calib=args.calib,
        preset=args.preset,
        assets=args.assets,
        device=args.device,
        full=args.full,
        weight_quantizer=args.weight_quantizer,
        weight_granularity=args.weight_granularity,
        act_granularity=args.act_granularity,
        output_bits=args.output_bits,
        glue_bits=args.glue_bits,
        matmul=not args.no_matmul,
        weights=args.weights,
        output=args.output,
        progress=not args.no_progress,
        deploy=args.deploy,
        arch=args.arch,
        arch_kwargs=args.arch_kwargs,
        input_range=args.input_range,
        layers=args.layers,
        keep_fp=args.keep_fp or (),
        no_adapt=args.no_adapt,
        **{k: v for k, v in overrides.items() if v is not None},
    )
    if result.inferred is not None:
        print("layout inferred from the network's graph (override with --layers / --keep-fp):")
        print(result.inferred.describe())
    for note in result.rollbacks:
        print(f"divergence guard: {note}")
    spec = result.spec
    print(
        f"{args.model or args.arch} x{args.scale} {result.method} W{spec.w_bits}A{spec.a_bits} "
        f"(weights per {spec.weight_granularity}): {result.report.summary()}"
    )
    size = Path(args.output).stat().st_size
    print(f"calibration took {result.calib_seconds:.1f} s; wrote {args.output} ({size / 1e6:.3f} MB)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    report = api.export_quantized(args.model, args.output, args.size, args.calib, args.assets, args.allow_inexact)
    shape = "any LR size" if report.dynamic_axes else f"LR {args.size[0]}x{args.size[1]}"
    glue = f" and {len(report.glue)} quantized tensors between them" if report.glue else ""
    print(f"wrote {args.output}: {len(report.convs)} integer convs / linear layers{glue}, for {shape}")
    if report.regridded_weights:
        print(f"note: {len(report.regridded_weights)} weights re-gridded to symmetric int8 (not bit-exact)")
    unsimulated = report.calibrated_outputs + report.image_outputs + report.shared_outputs
    if unsimulated:
        print(f"note: {len(unsimulated)} conv outputs are rounded to 8 bits without simulation (use --output-bits 8)")
    return 0


def cmd_bench_speed(args: argparse.Namespace) -> int:
    _json_output(args.json, args, args.model)
    dataset = None if args.psnr_dataset.lower() == "none" else args.psnr_dataset
    result = api.bench_speed(
        args.model, args.size, args.threads, args.runs, args.assets, args.calib, dataset, args.allow_inexact
    )
    print(f"backend {result.backend}, LR {args.size[0]}x{args.size[1]}, {result.threads} threads, {result.runs} runs")
    for setting, ms in result.timings_ms.items():
        print(f"  {setting:<14} {ms:9.1f} ms")
    print(f"fp32 {result.fp32_ms:.1f} ms ({result.fp32_setting}), int {result.int_ms:.1f} ms ({result.int_setting}):")
    print(f"speed-up {result.speedup:.2f}x; peak memory {result.peak_mb:.0f} MB int, {result.fp32_peak_mb:.0f} MB fp32")
    if result.psnr_delta_db is not None:
        print(
            f"{dataset} PSNR fake-quant {result.psnr_fake:.4f} dB, integer {result.psnr_int:.4f} dB, "
            f"difference {result.psnr_delta_db:+.4f} dB"
        )
    if args.json:
        result.write(args.json)
        print(f"wrote {args.json}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    written = api.write_lr_set(args.dataset, args.scale, args.out, args.assets)
    print(f"wrote {len(written)} LR images (x{args.scale}) to {args.out}")
    return 0


def cmd_upscale(args: argparse.Namespace) -> int:
    _one_network(args)
    api.upscale_file(
        args.model,
        args.input,
        args.output,
        args.scale,
        args.tile,
        args.assets,
        args.weights,
        args.download,
        args.device,
        args.tile_overlap,
        args.arch,
        args.arch_kwargs,
        args.input_range,
    )
    print(f"wrote {args.output}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    root, rows = api.list_models(args.assets)
    print(f"asset directory: {root}")
    print(f"{'name':<14} {'kind':<12} {'scales':<8} {'local weights':<14} note")
    for row in rows:
        scales = ",".join(map(str, row.scales))
        local = ",".join(f"x{s}" for s in row.local) or "-"
        print(f"{row.name:<14} {row.kind:<12} {scales:<8} {local:<14} {row.note}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    page = api.write_report(
        args.models,
        args.scale,
        args.datasets,
        args.output,
        args.assets,
        args.images,
        args.per_dataset,
        args.error_maps,
        args.device,
        not args.no_progress,
    )
    print(f"wrote {page} (open it in a browser; its images are beside it)")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    for row in api.list_methods():
        kind = "dynamic bits" if row.dynamic else "fixed bits"
        print(f"{row.name:<12} {kind:<13} presets: {', '.join(row.presets):<24} {row.summary}")
    return 0


COMMANDS = {
    "eval": cmd_eval,
    "quantize": cmd_quantize,
    "data": cmd_data,
    "upscale": cmd_upscale,
    "models": cmd_models,
    "export": cmd_export,
    "bench-speed": cmd_bench_speed,
    "methods": cmd_methods,
    "report": cmd_report,
}


def _notes_to_stderr(verbose: bool) -> None:
    """srquant's log records go to this run's stderr as `note: ...` lines (warnings; with -v, info too)."""
    logger = logging.getLogger("srquant")
    for handler in [h for h in logger.handlers if getattr(h, "srquant_notes", False)]:
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("note: %(message)s"))
    handler.srquant_notes = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    logger.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `srquant` console script."""
    args = build_parser().parse_args(argv)
    _notes_to_stderr(args.verbose)
    tune_allocator()
    try:
        return COMMANDS[args.command](args)
    except SrquantError as err:
        print(f"srquant: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("srquant: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
