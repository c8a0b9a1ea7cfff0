"""Where does a Granular-DQ checkpoint put its bits? Per-image FAB over some Urban100 images, and the bit maps of
the two images whose patches get the most different bits.

    python benchmarks/granular_bitmaps.py --model Q.pt --assets ../shared/assets [--dataset Urban100] [--limit 20]
        [--name granular_measured_imdn_x4] [--threads 1]

Writes docs/results/bitmaps/<name>_<image>.png and docs/results/bitmaps/<name>.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from common import RESULTS, header, run_main
from PIL import Image

from srquant import api
from srquant.data.benchmark import BenchmarkSet
from srquant.data.io import to_tensor
from srquant.methods.granular_dq.patchwise import PALETTE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--assets", default=None)
    parser.add_argument("--dataset", default="Urban100")
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--name", default="granular_imdn_x4")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = api.load_quantized(args.model, "cpu")
    if not hasattr(model, "bit_map"):
        raise SystemExit(f"{args.model} is not a patch-wise (Granular-DQ) model")
    folder = RESULTS / "bitmaps"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    with torch.no_grad():
        for index, pair in enumerate(BenchmarkSet.from_assets(args.dataset, args.assets).iter_pairs(model.scale)):
            if index >= args.limit:
                break
            lr = to_tensor(pair.lr)
            bits = [p.bit for p in model.patch_bits(lr)]
            rows.append((pair.name, float(np.mean(bits)), float(np.std(bits)), bits, lr))
    chosen = sorted(rows, key=lambda r: -r[2])[:2]
    lines = [header(f"Granular-DQ bit maps: {args.model.name}, {args.dataset}")]
    lines.append(
        f"\nThe first {len(rows)} {args.dataset} images: each image's mean patch bit (FAB) and the spread of its "
        "patch bits; the two images with the widest spread are drawn (each 96 px LR patch tinted by its bit).\n"
    )
    lines += ["| image | FAB | patch bits (count per bit) |", "|---|---|---|"]
    for name, fab, _, bits, _ in rows:
        counts = ", ".join(f"{b}: {bits.count(b)}" for b in sorted(set(bits)))
        lines.append(f"| {name} | {fab:.2f} | {counts} |")
    lines.append(f"\nMean FAB over these images: {np.mean([r[1] for r in rows]):.2f}.\n")
    lines.append("Tints: " + ", ".join(f"{bit} bits rgb{colour}" for bit, colour in PALETTE.items()) + ".\n")
    for name, fab, _, _, lr in chosen:
        target = folder / f"{args.name}_{name}.png"
        Image.fromarray(model.bit_map(lr)).save(target)
        lines.append(f"![{name}, FAB {fab:.2f}]({target.name})\n")
    (folder / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    run_main(main)
