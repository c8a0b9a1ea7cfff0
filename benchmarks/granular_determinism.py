"""Test-time determinism of a Granular-DQ checkpoint on real images: two separate runs, identical bits and outputs.

Each run is a fresh Python process that loads the checkpoint as `srquant eval` does and super-resolves every LR
image of the chosen sets patch-wise; it records each image's patch bits and the SHA-256 of the float32 SR tensor
(before the uint8 rounding, so a one-ulp difference shows). The two runs are then compared image by image.

    python benchmarks/granular_determinism.py --model Q.pt --assets ../shared/assets [--datasets Set5,Urban100]
        [--limit N] [--results docs/results/granular_determinism.md]

Make the checkpoint with `srquant quantize --model imdn --scale 4 --method granular-dq --wbits 8 --abits 8 -o Q.pt`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from common import RESULTS, header, run_main

SCALE = 4


def one_run(model_path: str, datasets: list[str], assets: str | None, limit: int | None) -> dict[str, dict]:
    """Super-resolve every LR image once; {dataset/image: {"bits": [...], "sha256": ...}}."""
    import torch

    from srquant import load_quantized
    from srquant.data.benchmark import BenchmarkSet
    from srquant.data.io import to_tensor
    from srquant.methods.granular_dq import PatchwiseBitsModel

    model = load_quantized(model_path, "cpu")
    if not isinstance(model, PatchwiseBitsModel):
        raise SystemExit(f"{model_path} is not a Granular-DQ checkpoint: no patch-wise bits to compare")
    model.eval()
    out: dict[str, dict] = {}
    for dataset in datasets:
        for i, pair in enumerate(BenchmarkSet.from_assets(dataset, assets).iter_pairs(SCALE)):
            if limit is not None and i >= limit:
                break
            lr = to_tensor(pair.lr)
            with torch.no_grad():
                sr = model(lr)
            bits = [p.bit for p in model.patch_bits(lr)]  # the bits of the run above (it is not repeated)
            digest = hashlib.sha256(sr.detach().to(torch.float32).contiguous().numpy().tobytes()).hexdigest()
            out[f"{dataset}/{pair.name}"] = {"bits": bits, "sha256": digest}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a Granular-DQ checkpoint (.pt)")
    parser.add_argument("--assets", default=None)
    parser.add_argument("--datasets", default="Set5,Urban100")
    parser.add_argument("--limit", type=int, default=None, help="images per set (default: all)")
    parser.add_argument("--results", type=Path, default=RESULTS / "granular_determinism.md")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)  # one run, JSON to this path
    args = parser.parse_args()
    datasets = [d for d in args.datasets.split(",") if d]
    if args.worker is not None:
        args.worker.write_text(json.dumps(one_run(args.model, datasets, args.assets, args.limit)))
        return
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(2):
            target = Path(tmp) / f"run{k}.json"
            cmd = [
                sys.executable,
                __file__,
                "--model",
                args.model,
                "--datasets",
                args.datasets,
                "--worker",
                str(target),
            ]
            cmd += ["--assets", args.assets] if args.assets else []
            cmd += ["--limit", str(args.limit)] if args.limit is not None else []
            subprocess.run(cmd, check=True)
            runs.append(json.loads(target.read_text()))
    first, second = runs
    if set(first) != set(second):
        raise SystemExit("the two runs saw different images")
    same_bits = [k for k in first if first[k]["bits"] == second[k]["bits"]]
    same_out = [k for k in first if first[k]["sha256"] == second[k]["sha256"]]
    patches = sum(len(v["bits"]) for v in first.values())
    counts = Counter(b for v in first.values() for b in v["bits"])
    lines = [
        header("Granular-DQ test-time determinism (two separate processes)"),
        f"Checkpoint `{args.model}`; sets {', '.join(datasets)}; {len(first)} images, {patches} patches; "
        f"patches per bit: {', '.join(f'{b} bits: {n}' for b, n in sorted(counts.items()))}.\n",
        "| check | images identical |",
        "|---|---|",
        f"| patch bits | {len(same_bits)}/{len(first)} |",
        f"| SR output (SHA-256 of the float32 tensor) | {len(same_out)}/{len(first)} |",
        "",
    ]
    for key in list(first)[:3]:
        lines.append(f"- `{key}`: bits {' '.join(map(str, first[key]['bits']))}, sha256 {first[key]['sha256'][:16]}...")
    text = "\n".join(lines) + "\n"
    print(text)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(text)
    if len(same_bits) != len(first) or len(same_out) != len(first):
        raise SystemExit("NOT deterministic: see the table")


if __name__ == "__main__":
    run_main(main)
