"""Where does the integer-deploy recipe (W7A8, `--deploy onnxruntime`) lose its Set5 PSNR? One network quantized
by one calibration method; then groups of quantizers (weights, layer inputs, simulated layer outputs, glue
tensors) and, with `--per-layer`, single output quantizers are switched back to float and Set5 is scored again.

    python benchmarks/deploy_ablation.py --assets ../shared/assets --network imdn --method minmax --threads 1 \
        [--per-layer]

Writes docs/results/deploy_ablation_<network>_<method>.md (fake-quant model; the integer graph follows it within
0.015 dB, docs/results/deploy_quality.md).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from common import RESULTS, fp_scores, header, run_main

from srquant import api, evaluate
from srquant.quant.quantize import mode_scope, quantizers
from srquant.quant.quantizers import QuantMode

SCALE = 4
GROUPS: dict[str, Callable[[str], bool]] = {
    "weights": lambda name: name.endswith("weight_quantizer"),
    "layer inputs": lambda name: name.endswith("input_quantizer"),
    "layer outputs": lambda name: name.endswith("output_quantizer"),
    "glue tensors": lambda name: "glue" in name,
}


def set5(model: torch.nn.Module, assets: str | None) -> float:
    """Set5 PSNR (BasicSR convention) of a model."""
    return evaluate(model, ["Set5"], SCALE, ["basicsr"], assets, progress=False)[0].psnr


def scored_with_float(model: torch.nn.Module, assets: str | None, chosen: Callable[[str], bool]) -> float:
    """Set5 PSNR with the chosen quantizers switched to float, then every mode restored."""
    with mode_scope(model, QuantMode.FP, chosen):
        return set5(model, assets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", default=None)
    parser.add_argument("--network", default="imdn")
    parser.add_argument("--method", default="minmax")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--per-layer", action="store_true", help="also each layer's output quantizer alone")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    fp = fp_scores(args.network, SCALE, ["Set5"], args.assets)["Set5"]["psnr"]
    result = api.quantize(
        args.network, SCALE, args.method, 8, 8, assets=args.assets, device="cpu", deploy="onnxruntime"
    )
    model = result.model
    full = set5(model, args.assets)
    names = [n for n, _ in quantizers(model)]
    title = f"Where the W7A8 deploy recipe loses Set5 PSNR: {args.network} x4, {args.method}"
    lines = [header(title), "", f"FP {fp:.3f}; every quantizer on {full:.3f} ({full - fp:+.3f} dB).", ""]
    lines += ["| group | quantizers | PSNR, this group float | gain | PSNR, only this group quantized | its cost |"]
    lines += ["|---|---|---|---|---|---|"]
    for group, member in GROUPS.items():
        count = sum(map(member, names))
        without = scored_with_float(model, args.assets, member)
        alone = scored_with_float(model, args.assets, lambda n, member=member: not member(n))
        lines.append(f"| {group} | {count} | {without:.3f} | {without - full:+.3f} | {alone:.3f} | {alone - fp:+.3f} |")
        print(lines[-1], flush=True)
    if args.per_layer:
        rows = []
        for name in (n for n in names if GROUPS["layer outputs"](n)):
            rows.append((scored_with_float(model, args.assets, lambda n, name=name: n == name) - full, name))
        rows.sort(reverse=True)
        lines += ["", "Each layer's output quantizer alone switched to float, largest gain first:", ""]
        lines += ["| output quantizer | gain |", "|---|---|"] + [f"| {n} | {g:+.3f} |" for g, n in rows]
    path = RESULTS / f"deploy_ablation_{args.network}_{args.method}.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    run_main(main)
