"""Why does AdaBM's adaptation lose to its fixed-bit twin? What +1 and -1 activation bit change, per layer and
per image, measured on an AdaBM model calibrated and fine-tuned at fixed bits (Image2Bit and Layer2Bit off).

    python benchmarks/adabm_sensitivity.py --assets ../shared/assets [--network imdn] [--bits 4] [--w-bits 8]
        [--weight-granularity tensor] [--crops 64] [--threads 2]

Everything is measured on held-out calibration crops (train291, a seed the calibration does not use), never on
a benchmark set: the MSE of the quantized output against the float output, per crop. Per layer: the change in
the mean MSE when that layer alone runs at base-1 or base+1 (its range unchanged, as AdaBM runs it), next to
Layer2Bit's measure (the layer input's std, which AdaBM ranks to give +1 to the top 30% and -1 to the bottom
30%). Per crop: the PSNR change with every adaptive layer at base+1 or base-1, next to Image2Bit's complexity
(mean gradient magnitude; AdaBM gives +1 above the 90th percentile and -1 below the 10th). The table reports
Spearman rank correlations, and what AdaBM's own allocation and the best allocation at the same mean bit
(chosen from these measurements) do to the MSE.
"""

from __future__ import annotations

import argparse

import torch
from common import RESULTS, header, run_main

from srquant import api
from srquant.methods.adabm import image_complexity
from srquant.methods.adabm.allocation import best_offsets
from srquant.methods.base import CalibrationData
from srquant.quant.quantize import fp_mode

HELD_OUT_SEED = 12345


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors."""
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))


@torch.no_grad()
def per_crop_mse(model: torch.nn.Module, quantizers: list, crops: torch.Tensor, target: torch.Tensor, bits: list[int]):
    """MSE per crop with adaptive layer k at bits[k] for every crop."""
    for q, b in zip(quantizers, bits, strict=True):
        q.bits_override = torch.full((crops.shape[0],), float(b))
    try:
        out = model.network(crops)
    finally:
        for q in quantizers:
            q.bits_override = None
    return (out - target).pow(2).flatten(1).mean(dim=1).double()


def psnr(mse: torch.Tensor) -> torch.Tensor:
    """PSNR of outputs in [0, 1] from their MSE."""
    return 10 * torch.log10(1 / mse.clamp_min(1e-12))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", default=None)
    parser.add_argument("--network", default="imdn")
    parser.add_argument("--bits", type=int, default=4, help="base activation bits")
    parser.add_argument("--w-bits", type=int, default=None, help="weight bits (default: --bits)")
    parser.add_argument("--weight-granularity", default="tensor", choices=("tensor", "channel"))
    parser.add_argument("--crops", type=int, default=64)
    parser.add_argument("--crop-size", type=int, default=48)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    w_bits = args.w_bits or args.bits
    result = api.quantize(
        args.network,
        4,
        "adabm",
        w_bits,
        args.bits,
        assets=args.assets,
        device="cpu",
        weight_granularity=args.weight_granularity,
        image2bit=False,
        layer2bit=False,
    )
    model = result.model
    controller = model.controller
    quantizers = model.adaptive_quantizers()
    names = list(controller.layer_names)
    base = controller.base_bits
    folder = api.calibration_folder(None, args.assets)
    pad = int(getattr(model.network, "pad_multiple", 1))
    data = CalibrationData(folder, 4, pad_multiple=pad)
    crops = data.crops(args.crops, data.rounded(args.crop_size), HELD_OUT_SEED)
    with torch.no_grad(), fp_mode(model.network):
        target = model.network(crops)
    n = len(names)
    base_mse = per_crop_mse(model, quantizers, crops, target, [base] * n)
    layer_delta = {}
    for delta in (-1, 1):
        rows = []
        for k in range(n):
            bits = [base] * n
            bits[k] = base + delta
            rows.append(per_crop_mse(model, quantizers, crops, target, bits).mean() / base_mse.mean() - 1)
        layer_delta[delta] = torch.stack(rows)
    std = controller.sensitivity.double()
    up_gain, down_loss = -layer_delta[1], layer_delta[-1]
    # AdaBM's Layer2Bit allocation: +1 to the top 30% of std, -1 to the bottom 30%.
    q = 0.3
    hi, lo = torch.quantile(std, 1 - q), torch.quantile(std, q)
    adabm_bits = [base + int(s > hi) - int(s < lo) for s in std.tolist()]
    adabm_mse = per_crop_mse(model, quantizers, crops, target, adabm_bits).mean() / base_mse.mean() - 1
    offsets = best_offsets(up_gain.tolist(), down_loss.tolist())
    best_bits = [base + o for o in offsets]
    best_mse = per_crop_mse(model, quantizers, crops, target, best_bits).mean() / base_mse.mean() - 1
    # Per crop: every layer at base+1 / base-1.
    crop_up = psnr(per_crop_mse(model, quantizers, crops, target, [base + 1] * n)) - psnr(base_mse)
    crop_down = psnr(base_mse) - psnr(per_crop_mse(model, quantizers, crops, target, [base - 1] * n))
    complexity = image_complexity(crops).double()
    share = 0.1
    c_hi, c_lo = torch.quantile(complexity, 1 - share), torch.quantile(complexity, share)
    image_bits = (complexity > c_hi).long() - (complexity < c_lo).long()
    adabm_img = float((crop_up * (image_bits == 1) - crop_down * (image_bits == -1)).sum() / len(crops))
    k = int((image_bits == 1).sum())
    by_gain = crop_up.argsort(descending=True)[:k]
    rest = torch.ones(len(crops), dtype=torch.bool)
    rest[by_gain] = False
    cheapest = crop_down.masked_fill(~rest, float("inf")).argsort()[:k]
    best_img = float((crop_up[by_gain].sum() - crop_down[cheapest].sum()) / len(crops))

    ratio = float(down_loss.mean() / up_gain.mean().clamp_min(1e-12))
    title = f"AdaBM sensitivity: {args.network} x4, base W{w_bits}A{args.bits}, {args.weight_granularity} weights"
    lines = [header(title), ""]
    lines.append(
        f"{args.crops} held-out train291 LR crops of {crops.shape[-1]} px; the model: AdaBM calibrated and fine-tuned "
        f"with Image2Bit and Layer2Bit off (preset cpu), {n} adaptive layers (the zoo layout's body).\n"
    )
    lines.append("## Per layer: the output MSE change (relative to all layers at the base) with one layer moved\n")
    lines.append("| layer | input std (Layer2Bit) | AdaBM's bit | -1 bit: MSE change | +1 bit: MSE change |")
    lines.append("|---|---|---|---|---|")
    for k, name in enumerate(names):
        lines.append(
            f"| {name} | {float(std[k]):.4f} | {adabm_bits[k] - base:+d} | {float(layer_delta[-1][k]):+.1%} | "
            f"{float(layer_delta[1][k]):+.1%} |"
        )
    lines += [
        "",
        f"- Spearman(std, cost of -1 bit) = {spearman(std, down_loss):+.2f}; Spearman(std, gain of +1 bit) = "
        f"{spearman(std, up_gain):+.2f}. Layer2Bit's premise needs both positive: the layers it raises should "
        "gain most, the ones it lowers lose least.",
        f"- Mean over layers: -1 bit costs {float(down_loss.mean()):+.1%} MSE, +1 bit gains "
        f"{float(up_gain.mean()):.1%}: a step down costs {ratio:.1f}"
        "x what a step up gains.",
        f"- AdaBM's Layer2Bit allocation ({sum(b > base for b in adabm_bits)} up, {sum(b < base for b in adabm_bits)} "
        f"down, mean bit {sum(adabm_bits) / n:.2f}): output MSE {float(adabm_mse):+.1%} against fixed bits.",
        f"- Best allocation at mean bit {sum(best_bits) / n:.2f} from these measurements ({offsets.count(1)} up, "
        f"{offsets.count(-1)} down; the rule of `allocation='measured'`, which applies it to calibration "
        f"crops): output MSE {float(best_mse):+.1%} against fixed bits.",
        "",
        "## Per crop: PSNR change with every adaptive layer moved by one bit\n",
        f"- Spearman(complexity, PSNR gain of +1) = {spearman(complexity, crop_up):+.2f}; Spearman(complexity, "
        f"PSNR cost of -1) = {spearman(complexity, crop_down):+.2f}. Image2Bit's premise: complex crops gain "
        "most from +1 (positive) and simple crops lose least from -1 (positive).",
        f"- Mean over crops: +1 gains {float(crop_up.mean()):.2f} dB, -1 costs {float(crop_down.mean()):.2f} dB.",
        f"- Image2Bit's allocation ({k} crops up, {int((image_bits == -1).sum())} down): mean PSNR change "
        f"{adabm_img:+.3f} dB. The best {k} up / {k} down from these measurements: {best_img:+.3f} dB.",
    ]
    out = RESULTS / f"adabm_sensitivity_{args.network}_w{w_bits}a{args.bits}_{args.weight_granularity}.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    run_main(main)
