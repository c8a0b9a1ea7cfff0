"""The layout srquant infers for a network outside the zoo, against the hand-written layouts of the zoo CNNs,
and Set5 at W4A4 with each (the same method, preset and calibration crops).

    python benchmarks/inferred_layouts.py --assets ../shared/assets [--method dobi] [--threads 1]

Writes docs/results/inferred_layouts.md (and .json).
"""

from __future__ import annotations

import argparse
import re

import torch
from common import RESULTS, header, machine, run_main, save_json

import srquant
from srquant.models.infer_layout import infer_layout
from srquant.models.registry import get_entry
from srquant.quant.spec import matches

NETWORKS = ("imdn", "pan", "carn-m")


def hand_groups(name: str, modules: list[str]) -> dict[str, list[str]]:
    """The hand-written layout's body, fixed (A8 with --full) and never groups over the network's candidates."""
    layout = get_entry(name).layout
    never = [m for m in modules if matches(m, layout.never)]
    body = [m for m in modules if m not in never and matches(m, layout.body)]
    fixed = [m for m in modules if m not in never and m not in body and matches(m, layout.fixed_8bit)]
    return {"body": body, "fixed": fixed, "never": never}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", default="../shared/assets")
    parser.add_argument("--method", default="dobi")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in NETWORKS:
        network = srquant.load_model(name, 4, args.assets, device="cpu")
        candidates = [n for n, m in network.named_modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
        hand = hand_groups(name, candidates)
        inferred = infer_layout(network)
        auto = {
            "body": inferred.body,
            "fixed": sorted(set(inferred.head) | set(inferred.output)),
            "never": inferred.never,
        }
        scores = {}
        for label, layout in (("hand-written", None), ("inferred", inferred.layout)):
            model = srquant.load_model(name, 4, args.assets, device="cpu")
            result = srquant.quantize(model, 4, args.method, 4, 4, assets=args.assets, device="cpu", layout=layout)
            psnr = srquant.evaluate(result.model, ["Set5"], 4, assets=args.assets, progress=False)[0].psnr
            scores[label] = {"psnr": psnr, "layers": result.report.summary()}
            print(name, label, f"{psnr:.2f}", result.report.summary(), flush=True)
        rows.append({"network": name, "hand": hand, "inferred": auto, "scores": scores})
    save_json(RESULTS / "inferred_layouts.json", {"method": args.method, "machine": machine(), "rows": rows})
    write_table(rows, args.method)


def _diff(a: list[str], b: list[str]) -> str:
    only = sorted(set(a) - set(b))
    return ", ".join(re.sub(r"\d+", "N", n) for n in dict.fromkeys(only)) or "-"


def write_table(rows: list[dict], method: str) -> None:
    """docs/results/inferred_layouts.md."""
    command = f"python benchmarks/inferred_layouts.py --assets ../shared/assets --method {method}"
    lines = [header("Inferred layouts against the hand-written ones (zoo CNNs, x4)", command), ""]
    lines.append(
        f"Both layouts quantized W4A4 by `{method}` (preset `cpu`, per-channel weights, the same calibration crops); "
        "Set5 PSNR, BasicSR convention. Layer names with digits replaced by N.\n"
    )
    lines.append(
        "| network | body (hand / inferred) | only in the inferred body | only in the hand body | "
        "A8-with-full (hand / inferred) | Set5 hand | Set5 inferred |"
    )
    lines.append("|---|---|---|---|---|---|---|")
    for row in rows:
        hand, auto, scores = row["hand"], row["inferred"], row["scores"]
        lines.append(
            f"| {row['network']} | {len(hand['body'])} / {len(auto['body'])} | {_diff(auto['body'], hand['body'])} | "
            f"{_diff(hand['body'], auto['body'])} | {', '.join(hand['fixed'])} / {', '.join(auto['fixed'])} | "
            f"{scores['hand-written']['psnr']:.2f} | {scores['inferred']['psnr']:.2f} |"
        )
    (RESULTS / "inferred_layouts.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    run_main(main)
