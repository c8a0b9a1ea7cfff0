"""Which layer inputs hold a quantized model's loss? Load a saved checkpoint, switch one group of input quantizers
(every `input_quantizer` and matmul operand whose name matches once block indices are replaced by `#`) to float
with every other quantizer as saved, and score Set5 again, and PSNR on held-out training crops.

    python benchmarks/input_ablation.py --model Q.pt --assets ../shared/assets --name carn-m_w2a2 --threads 2 \
        [--by-block] [--held-out 32]

The held-out crops (LR/HR pairs from the calibration folder, drawn with a seed no method uses) say whether a
group's loss shows without the benchmark images: a layout change chosen from this column is not chosen on a test
set. `--held-out 0` skips them.

`--by-block` keeps the index of a layer inside its block (IMDN's `IMDB#.c1` ... `c5` as separate groups) and
replaces only the block's. Writes docs/results/input_ablation_<name>.md. A negative gain means the method fitted
the rest of the network to that group's rounding.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict

import numpy as np
import torch
from common import RESULTS, header, run_main
from deploy_ablation import scored_with_float, set5

from srquant.api import calibration_folder
from srquant.assets import asset_dir
from srquant.data.calibration import CropSampler
from srquant.methods.pipeline import load_checkpoint
from srquant.quant.quantize import mode_scope, quantizers
from srquant.quant.quantizers import QuantMode

HELD_OUT_SEED = 9173  # no method draws calibration crops with this seed (they use 0-4 and their own seeds)
HELD_OUT_SIZE = 48  # LR crop side


def held_out_crops(scale: int, assets: str | None, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` aligned LR/HR crops from the calibration folder, drawn with `HELD_OUT_SEED`."""
    root = asset_dir(assets)
    sampler = CropSampler(calibration_folder(None, assets), scale, HELD_OUT_SIZE, root / "datasets")
    lr, hr = sampler.draw(count, np.random.default_rng(HELD_OUT_SEED), with_hr=True)
    assert hr is not None
    return lr, hr


@torch.no_grad()
def crops_psnr(model: torch.nn.Module, crops: tuple[torch.Tensor, torch.Tensor]) -> float:
    """PSNR (RGB, [0, 1], all crops pooled) of the model's outputs against the HR crops."""
    lr, hr = crops
    squared = sum(
        float(torch.sum((model(x).clamp(0, 1) - y) ** 2)) for x, y in zip(lr.split(8), hr.split(8), strict=True)
    )
    return 10 * float(np.log10(hr.numel() / squared))


def group_name(name: str, by_block: bool) -> str:
    """A quantizer's group: its name with the block indices (or every index) replaced by `#`."""
    return re.sub(r"^(\w+?)\d+", r"\1#", name) if by_block else re.sub(r"\d+", "#", name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--assets", default=None)
    parser.add_argument("--name", required=True)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--by-block", action="store_true")
    parser.add_argument("--held-out", type=int, default=32, help="held-out training crops to score (0: none)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_checkpoint(args.model)
    model = loaded.model
    crops = held_out_crops(loaded.scale, args.assets, args.held_out) if args.held_out else None
    groups: dict[str, int] = defaultdict(int)
    for name, _ in quantizers(model):
        if not name.endswith("weight_quantizer"):
            groups[group_name(name, args.by_block)] += 1
    saved = set5(model, args.assets)
    lines = [header(f"Input quantizers switched to float one group at a time: {args.name}, x4")]
    lines.append(f"\nSet5 (BasicSR) as saved: {saved:.3f}.")
    columns = "| group | quantizers | Set5, this group float | gain |"
    if crops is not None:
        held = crops_psnr(model, crops)
        lines.append(
            f"Held-out training crops ({args.held_out} LR crops of {HELD_OUT_SIZE} px from the calibration folder, "
            f"seed {HELD_OUT_SEED}, RGB PSNR) as saved: {held:.3f}."
        )
        columns += " held-out crops, this group float | gain |"
    lines += ["", columns, "|---" * columns.count(" | ") + "|---|"]
    for group, count in sorted(groups.items()):

        def in_group(name: str, group: str = group) -> bool:
            return group_name(name, args.by_block) == group

        score = scored_with_float(model, args.assets, in_group)
        row = f"| {group} | {count} | {score:.3f} | {score - saved:+.3f} |"
        if crops is not None:
            with mode_scope(model, QuantMode.FP, in_group):
                other = crops_psnr(model, crops)
            row += f" {other:.3f} | {other - held:+.3f} |"
        lines.append(row)
        print(lines[-1], flush=True)
    (RESULTS / f"input_ablation_{args.name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    run_main(main)
