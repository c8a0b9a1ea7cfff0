"""Command-line interface: parse arguments, call the API, print. Bad input exits 2 with one line on stderr."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from srquant import api
from srquant.assets import asset_dir
from srquant.errors import SrquantError
from srquant.evaluate import DatasetResult
from srquant.models.registry import REGISTRY, checkpoint_path
from srquant.runtime import tune_allocator


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _comma_list(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="zoo model name (see `srquant models`)")
    parser.add_argument("--scale", type=_positive_int, required=True, help="upscaling factor")
    parser.add_argument("--weights", help="load this checkpoint instead of the registry's (strictly)")
    parser.add_argument("--download", action="store_true", help="fetch a missing checkpoint (sha256-verified)")
    parser.add_argument("--tile", type=_positive_int, help="tiled inference with this LR tile size")


def _add_assets_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--assets", help="asset directory with weights/ and datasets/ (default: $SRQUANT_ASSETS)")


def build_parser() -> argparse.ArgumentParser:
    """The `srquant` argument parser with its sub-commands."""
    parser = argparse.ArgumentParser(prog="srquant", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="print notes (image conversions etc.)")
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("eval", help="evaluate a model on benchmark sets (PSNR/SSIM on Y)")
    _add_model_args(ev)
    _add_assets_arg(ev)
    ev.add_argument("--datasets", type=_comma_list, default=["Set5", "Set14", "B100", "Urban100"])
    ev.add_argument("--convention", type=_comma_list, default=["basicsr"], help="basicsr, edsr, or both: basicsr,edsr")
    ev.add_argument("--json", type=Path, help="write the results to this JSON file")
    ev.add_argument("--no-progress", action="store_true", help="hide the progress bar")

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

    models = sub.add_parser("models", help="list the model zoo and what is available locally")
    _add_assets_arg(models)
    return parser


def format_table(results: Sequence[DatasetResult]) -> str:
    """A plain-text table of results, each row labelled with its convention."""
    lines = [f"{'dataset':<10} {'conv':<8} {'PSNR':>8} {'SSIM':>7} {'images':>6} {'seconds':>8}"]
    for r in results:
        lines.append(
            f"{r.dataset:<10} {r.convention:<8} {r.psnr:>8.4f} {r.ssim:>7.4f} {r.images:>6d} {r.seconds:>8.1f}"
        )
    return "\n".join(lines)


def cmd_eval(args: argparse.Namespace) -> int:
    model = api.load_model(args.model, args.scale, args.assets, args.weights, args.download)
    results = api.evaluate(
        model,
        args.datasets,
        args.scale,
        args.convention,
        args.assets,
        args.tile,
        progress=not args.no_progress,
    )
    print(f"{args.model} x{args.scale}")
    print(format_table(results))
    if args.json:
        record = {
            "model": args.model,
            "scale": args.scale,
            "convention": ",".join(args.convention),
            "results": [r.summary() for r in results],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    written = api.write_lr_set(args.dataset, args.scale, args.out, args.assets)
    print(f"wrote {len(written)} LR images (x{args.scale}) to {args.out}")
    return 0


def cmd_upscale(args: argparse.Namespace) -> int:
    model = api.load_model(args.model, args.scale, args.assets, args.weights, args.download)
    api.upscale_file(model, args.input, args.output, args.tile)
    print(f"wrote {args.output}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    root = asset_dir(args.assets)
    print(f"asset directory: {root}")
    print(f"{'name':<14} {'kind':<12} {'scales':<8} {'local weights':<14} note")
    for entry in REGISTRY.values():
        local = []
        for scale in entry.scales:
            try:
                checkpoint_path(entry, scale, args.assets, allow_download=False)
                local.append(f"x{scale}")
            except SrquantError:
                pass
        scales = ",".join(map(str, entry.scales))
        print(f"{entry.name:<14} {entry.kind:<12} {scales:<8} {','.join(local) or '-':<14} {entry.note}")
    return 0


COMMANDS = {"eval": cmd_eval, "data": cmd_data, "upscale": cmd_upscale, "models": cmd_models}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `srquant` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="note: %(message)s")
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
