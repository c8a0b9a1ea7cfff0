"""How much can patch bits pay at all? A Granular-DQ checkpoint's own allocation against the best allocation
that knows the HR image (an oracle), random allocations of the same histogram and one bit for every patch.

    python benchmarks/granular_oracle.py --model Q.pt --fixed 4=F4.pt,5=F5.pt,6=F6.pt --assets ../shared/assets
        [--datasets Set5,Set14] [--name imdn_budget4.5] [--threads 1]

Every patch of every image is super-resolved once at each candidate bit (the checkpoint's own network and
quantizers; `fixed_bits` forced on its controller) and once as the controller chooses. An allocation is then
scored exactly as `srquant eval` scores it: its patches stitched with the same overlap averaging, rounded to
uint8, PSNR on Y (BasicSR convention). Allocations at the controller's FAB on each dataset:
- `controller`: the checkpoint's own bits (equal to the `srquant eval` result; printed as a check);
- `oracle`: per patch the bit that maximises the dataset's mean PSNR at that mean bit, chosen with the HR image
  (a price per bit on each patch's error relative to its image's error, bisected to the controller's FAB; two
  re-linearisations). No deployable controller can know the HR image, so this bounds what any allocation of
  this network can reach;
- `random`: the controller's histogram, patches shuffled per image (mean of --draws draws);
- `uniform B`: every patch at bit B (the shared network's fixed-bit operating points).
`fixed line` is the PSNR of the separately trained fixed-bit twins (`--fixed`, `--no-adapt --abits B`
checkpoints) interpolated at the FAB; the gap to it splits into the cost of one network serving every bit
(`uniform` against the twins) and what the allocation wins back (`controller` or `oracle` against `random`).
Results: docs/results/granular_oracle_<name>.md and .json.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from common import RESULTS, command, header, load_json, run_main, save_json

from srquant import api, evaluate
from srquant.data.benchmark import BenchmarkSet
from srquant.data.io import to_tensor, to_uint8
from srquant.methods.granular_dq.patchwise import PatchwiseBitsModel, paste_patch
from srquant.metrics.psnr_ssim import get_convention, psnr_y, y_channel

SCALE = 4


@dataclass
class ImagePatches:
    """One test image: its HR, its patch boxes and each patch's SR output at every candidate bit."""

    hr: np.ndarray
    lr_size: tuple[int, int]
    boxes: list[tuple[int, int, int, int]]
    outputs: dict[int, list[torch.Tensor]]  # bit -> per-patch SR (1x3xhxw)
    chosen: list[int]  # the controller's bit per patch
    patch_errors: dict[int, np.ndarray]  # bit -> per-patch squared error on Y (sum over the patch's HR area)


def patch_error(sr_patch: torch.Tensor, hr_y: np.ndarray, box: tuple[int, int, int, int]) -> float:
    """Squared error on Y (BasicSR) of one patch's uint8 SR output against its HR area (sum, no border crop)."""
    t, c, h, w = box
    area = hr_y[SCALE * t : SCALE * (t + h), SCALE * c : SCALE * (c + w)]
    return float(((y_channel(to_uint8(sr_patch), get_convention("basicsr")) - area) ** 2).sum())


@torch.no_grad()
def run_patches(model: PatchwiseBitsModel, dataset: BenchmarkSet, bits: list[int]) -> list[ImagePatches]:
    """Every patch of every image at every bit (the controller forced to it), and the controller's own bits."""
    controller, network = model.controller, model.network
    images = []
    for pair in dataset.iter_pairs(SCALE):
        lr = to_tensor(pair.lr)
        chosen = model.patch_bits(lr)  # the patches and bits `srquant eval` runs
        boxes = [(p.top, p.left, p.height, p.width) for p in chosen]
        hr_y = y_channel(pair.hr, get_convention("basicsr")).astype(np.float64)
        outputs: dict[int, list[torch.Tensor]] = {}
        errors: dict[int, np.ndarray] = {}
        try:
            for b in bits:
                controller.fixed_bits = b
                outputs[b] = [network(lr[..., t : t + h, c : c + w]) for t, c, h, w in boxes]
                errors[b] = np.array([patch_error(o, hr_y, box) for o, box in zip(outputs[b], boxes, strict=True)])
        finally:
            controller.fixed_bits = None
        lr_size = (lr.shape[-2], lr.shape[-1])
        images.append(ImagePatches(pair.hr, lr_size, boxes, outputs, [p.bit for p in chosen], errors))
    return images


def stitch(image: ImagePatches, allocation: list[int]) -> torch.Tensor:
    """The SR image of one allocation, stitched as `upscale_patchwise` does (overlaps averaged)."""
    height, width = image.lr_size
    out = torch.zeros(1, 3, height * SCALE, width * SCALE)
    weight = torch.zeros(1, 1, height * SCALE, width * SCALE)
    for k, (box, b) in enumerate(zip(image.boxes, allocation, strict=True)):
        paste_patch(out, weight, image.outputs[b][k], box, SCALE)
    return out / weight


def score(images: list[ImagePatches], allocations: list[list[int]]) -> tuple[float, float]:
    """Mean PSNR (BasicSR) and mean FAB of one allocation per image."""
    psnrs = [
        psnr_y(to_uint8(stitch(im, a)), im.hr, SCALE, "basicsr") for im, a in zip(images, allocations, strict=True)
    ]
    return float(np.mean(psnrs)), mean_fab(allocations)


def priced(images: list[ImagePatches], bits: list[int], reference: list[float], price: float) -> list[list[int]]:
    """Per patch the bit minimising its error relative to its image's reference error + price * bit / patches."""
    chosen = []
    for im, ref in zip(images, reference, strict=True):
        cost = np.stack([im.patch_errors[b] / max(ref, 1e-12) + price * b / len(im.boxes) for b in bits], axis=1)
        chosen.append([bits[i] for i in cost.argmin(axis=1)])
    return chosen


def mean_fab(allocations: list[list[int]]) -> float:
    """FAB as `srquant eval` reports it: each image's mean patch bit, averaged over images."""
    return float(np.mean([sum(a) / len(a) for a in allocations]))


def oracle(images: list[ImagePatches], bits: list[int], target_fab: float) -> list[list[int]]:
    """The HR-aware allocation at mean FAB <= `target_fab`: `priced` with the price bisected; first-order in each
    image's PSNR (errors relative to the image's error), re-linearised twice around the last choice."""
    allocation = [list(im.chosen) for im in images]
    for _ in range(3):
        reference = [
            sum(im.patch_errors[b][k] for k, b in enumerate(a)) for im, a in zip(images, allocation, strict=True)
        ]
        low, high = 0.0, 1.0
        while mean_fab(priced(images, bits, reference, high)) > target_fab and high < 1e9:
            high *= 2
        for _ in range(50):
            middle = (low + high) / 2
            over = mean_fab(priced(images, bits, reference, middle)) > target_fab
            low, high = (middle, high) if over else (low, middle)
        allocation = priced(images, bits, reference, high)
    return allocation


def shuffled(images: list[ImagePatches], seed: int) -> list[list[int]]:
    """The controller's bits of each image, handed to its patches in a random order."""
    rng = np.random.default_rng(seed)
    return [list(rng.permutation(im.chosen)) for im in images]


def fixed_line(fixed: dict[int, float], fab: float) -> float | None:
    """The fixed twins' PSNR at `fab`, linear between the two nearest bits (a twin's own PSNR at its bit)."""
    if fab in fixed:
        return fixed[fab]
    points = sorted(fixed.items())
    for (b0, p0), (b1, p1) in zip(points, points[1:], strict=False):
        if b0 <= fab <= b1:
            return p0 + (p1 - p0) * (fab - b0) / (b1 - b0)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--fixed", default="", help="BIT=checkpoint,... of the fixed-bit twins")
    parser.add_argument("--assets", default=None)
    parser.add_argument("--datasets", default="Set5,Set14")
    parser.add_argument("--name", default=None)
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--table-only", action="store_true", help="rewrite the table from the stored JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.table_only:
        name = args.name or args.model.stem
        stored = load_json(RESULTS / f"granular_oracle_{name}.json")
        write_table(name, stored["datasets"], stored["command"])
        return
    model = api.load_quantized(args.model, "cpu")
    bits = sorted({*model.controller.gbc_bits, *(model.controller.e2b_bits if model.controller.use_e2b else ())})
    fixed_models = {int(b): Path(p) for b, p in (item.split("=") for item in args.fixed.split(",") if item)}
    name = args.name or args.model.stem
    record: dict[str, dict] = {}
    for dataset_name in args.datasets.split(","):
        dataset = BenchmarkSet.from_assets(dataset_name, args.assets)
        images = run_patches(model, dataset, bits)
        rows: dict[str, tuple[float, float]] = {"controller": score(images, [im.chosen for im in images])}
        fab = rows["controller"][1]
        rows["oracle"] = score(images, oracle(images, bits, fab))
        draws = [score(images, shuffled(images, seed)) for seed in range(args.draws)]
        rows["random"] = (float(np.mean([d[0] for d in draws])), float(np.mean([d[1] for d in draws])))
        for b in bits:
            rows[f"uniform {b}"] = score(images, [[b] * len(im.boxes) for im in images])
        fixed = {}
        for b, path in sorted(fixed_models.items()):
            twin = api.load_quantized(path, "cpu")
            fixed[b] = evaluate(twin, [dataset_name], SCALE, ["basicsr"], args.assets, progress=False)[0].psnr
        record[dataset_name] = {
            "rows": {k: {"psnr": p, "fab": f} for k, (p, f) in rows.items()},
            "fixed_twins": fixed,
            "patches": sum(len(im.boxes) for im in images),
        }
        print(dataset_name, {k: f"{p:.3f}@{f:.2f}" for k, (p, f) in rows.items()}, "twins", fixed, flush=True)
    save_json(RESULTS / f"granular_oracle_{name}.json", {"command": command(), "datasets": record})
    write_table(name, record, command())


def write_table(name: str, record: dict[str, dict], produced_by: str) -> None:
    """The markdown table: each allocation's PSNR and FAB, against the fixed line and the random shuffle."""
    lines = [header(f"Granular-DQ allocations against an HR oracle ({name}, x4)", produced_by), ""]
    lines.append(
        "PSNR (BasicSR) at the FAB each allocation runs; `vs fixed line`: minus the separately trained fixed-bit "
        "twins interpolated at that FAB; `vs random`: minus the same histogram shuffled over each image's patches. "
        "`uniform B`: this checkpoint's network with every patch at B; `twin B`: the fixed-bit twin trained at B.\n"
    )
    lines.append("| dataset | allocation | PSNR | FAB | vs fixed line | vs random |")
    lines.append("|---|---|---|---|---|---|")
    for dataset, entry in record.items():
        fixed = {int(b): p for b, p in entry["fixed_twins"].items()}
        random_psnr = entry["rows"]["random"]["psnr"]
        for label, row in entry["rows"].items():
            line = fixed_line(fixed, row["fab"]) if fixed else None
            vs_fixed = f"{row['psnr'] - line:+.3f}" if line is not None else "-"
            vs_random = f"{row['psnr'] - random_psnr:+.3f}" if label in ("controller", "oracle") else "-"
            lines.append(f"| {dataset} | {label} | {row['psnr']:.3f} | {row['fab']:.2f} | {vs_fixed} | {vs_random} |")
        for b, p in sorted(fixed.items()):
            lines.append(f"| {dataset} | twin {b} | {p:.3f} | {b:.2f} | - | - |")
    text = "\n".join(lines) + "\n"
    (RESULTS / f"granular_oracle_{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    run_main(main)
