"""Which layer inputs hold a quantized model's loss? Load a saved checkpoint, switch one group of input quantizers
(every `input_quantizer` and matmul operand whose name matches once block indices are replaced by `#`) to float
with every other quantizer as saved, and score Set5 again.

    python benchmarks/input_ablation.py --model Q.pt --assets ../shared/assets --name carn-m_w2a2 --threads 2 \
        [--by-block]

`--by-block` keeps the index of a layer inside its block (IMDN's `IMDB#.c1` ... `c5` as separate groups) and
replaces only the block's. Writes docs/results/input_ablation_<name>.md. A negative gain means the method fitted
the rest of the network to that group's rounding.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict

import torch
from common import RESULTS, header
from deploy_ablation import scored_with_float, set5

from srquant import load_quantized
from srquant.quant.quantize import quantizers


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
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_quantized(args.model)
    groups: dict[str, int] = defaultdict(int)
    for name, _ in quantizers(model):
        if not name.endswith("weight_quantizer"):
            groups[group_name(name, args.by_block)] += 1
    saved = set5(model, args.assets)
    lines = [header(f"Input quantizers switched to float one group at a time: {args.name}, x4")]
    lines += [f"\nSet5 (BasicSR) as saved: {saved:.3f}.\n", "| group | quantizers | Set5, this group float | gain |"]
    lines.append("|---|---|---|---|")
    for group, count in sorted(groups.items()):
        score = scored_with_float(model, args.assets, lambda n, g=group: group_name(n, args.by_block) == g)
        lines.append(f"| {group} | {count} | {score:.3f} | {score - saved:+.3f} |")
        print(lines[-1], flush=True)
    (RESULTS / f"input_ablation_{args.name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
