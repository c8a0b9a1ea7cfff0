"""Peak memory of a tiled x4 upscale against the image size: it must grow with the tile, not the image.

    python benchmarks/tiled_memory.py --assets ../shared/assets [--model imdn] [--tile 200] [--sides 1000,3000]

Each run is `srquant upscale IN.png -o OUT.png --model M --scale 4 --tile T` in a fresh process; its peak
resident set comes from the kernel (`getrusage(RUSAGE_CHILDREN)` of a parent that runs only that one child).
The input images are smooth random pictures made here. Writes docs/results/tiled_memory.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import RESULTS, header, run_main
from PIL import Image

PARENT = (
    "import resource, subprocess, sys\n"
    "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
    "sys.stderr.write(done.stderr)\n"
    "print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
)


def picture(side: int, path: Path) -> Path:
    """A smooth random RGB picture of side x side pixels."""
    coarse = np.random.default_rng(side).integers(0, 256, (side // 50 + 2, side // 50 + 2, 3), dtype=np.uint8)
    Image.fromarray(coarse).resize((side, side), Image.BICUBIC).save(path)
    return path


def peak_mb(argv: list[str]) -> tuple[float, float]:
    """(peak resident MB, wall seconds) of one command in a fresh process."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PARENT, *argv], capture_output=True, text=True, check=True)
    code, kib = done.stdout.split()
    if code != "0":
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()[-300:]}")
    return int(kib) / 1024, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", default="../shared/assets")
    parser.add_argument("--model", default="imdn")
    parser.add_argument("--tile", type=int, default=200)
    parser.add_argument("--sides", default="1000,3000")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="srquant-tiles-") as tmp:
        for side in [int(s) for s in args.sides.split(",")]:
            src = picture(side, Path(tmp) / f"in_{side}.png")
            out = Path(tmp) / f"out_{side}.png"
            argv = [sys.executable, "-m", "srquant", "upscale", str(src), "-o", str(out), "--model", args.model]
            argv += ["--scale", "4", "--tile", str(args.tile), "--assets", args.assets, "--device", "cpu"]
            mb, seconds = peak_mb(argv)
            with Image.open(out) as img:
                size = img.size
            rows.append((side, size, mb, seconds))
            print(f"{side}x{side} -> {size[0]}x{size[1]}: peak {mb:.0f} MB, {seconds:.0f} s", flush=True)
    command = f"python benchmarks/tiled_memory.py --assets ../shared/assets --model {args.model} --tile {args.tile}"
    lines = [header(f"Peak memory of a tiled x4 upscale ({args.model}, --tile {args.tile})", command), ""]
    lines.append("| LR input | SR output | peak resident memory | wall time |")
    lines.append("|---|---|---|---|")
    for side, size, mb, seconds in rows:
        lines.append(f"| {side}x{side} | {size[0]}x{size[1]} | {mb:.0f} MB | {seconds:.0f} s |")
    if len(rows) > 1:
        lines += ["", f"Largest over smallest peak: {max(r[2] for r in rows) / min(r[2] for r in rows):.2f}x."]
    (RESULTS / "tiled_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    run_main(main)
