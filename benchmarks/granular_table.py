"""Granular-DQ on IMDN, PAN and LMLT-Tiny (x4): fixed-bit baselines vs patch-wise bits, and the paper's Table 3
ablation on IMDN.
PSNR/SSIM (BasicSR convention), per-image FAB and BitOPs as `srquant eval` reports them, training wall time.
Resumable: finished cells live in docs/results/granular_<preset>.json and are skipped on a re-run.

    python benchmarks/granular_table.py --assets ../shared/assets [--preset cpu] [--only imdn:fixed4,pan]
        [--datasets Set5,Set14] [--results PATH.json] [--table-only] [--iterations N] [--bitmaps DIR]

Cells (`NAME|VARIANT`): `fixed8` and `fixed4` (`fixed_bits`: every patch at that bit, the same LSQ quantizer,
patch-wise inference and training schedule, no controller) and `granular-dq` (defaults) for imdn, pan and
lmlt-tiny; on IMDN also `controller-only` (e2b=False, atc=False) and `e2b` (atc=False), the rows of the paper's
Table 3; and `fp-patchwise` (the float network run on the same 96 px patches, to show what patch-wise inference
alone costs).
Each quantized cell goes through `quantize_model(..., "granular-dq", QuantSpec(8, 8), ...)` (per-tensor weights, as
the stored cells were) on <assets>/calibration/train291, is saved as a checkpoint and evaluated from it by
`api.evaluate_model`, the code path of `srquant eval --model Q.pt` (patch-wise, 96 px LR patches, step 90).
`--iterations N` trains for N iterations with the preset's schedule stretched (smoke runs, or longer runs with
`--results` elsewhere; recorded, and such a cell is re-run by a later run without it). `--bitmaps DIR` writes bit
maps of two Urban100 images of the imdn `granular-dq` cell (lowest and highest FAB) and a markdown page embedding them.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS, fp_scores, header, load_json, run_main, update_json
from torch import nn

from srquant import evaluate, load_model
from srquant.api import evaluate_model
from srquant.data.benchmark import BenchmarkSet
from srquant.data.io import read_image, write_image
from srquant.methods.granular_dq import PALETTE, PatchBit, bit_map, patch_boxes
from srquant.methods.granular_dq import upscale_patchwise as patchwise
from srquant.methods.pipeline import quantize_model
from srquant.methods.registry import get_method
from srquant.models.registry import get_entry
from srquant.quant.accounting import model_cost
from srquant.quant.spec import QuantSpec

SCALE = 4
DATASETS = ["Set5", "Set14", "B100", "Urban100"]
NETWORKS = ("imdn", "pan", "lmlt-tiny")
PATCH, STEP = 96, 90  # the patch-wise evaluation's LR patch and step (PatchwiseBitsModel's defaults)
WEIGHT_GRANULARITY = "tensor"  # the stored cells were measured per tensor (before per-channel weights existed)
FP_PATCHWISE = "fp-patchwise"
VARIANTS: dict[str, dict[str, object]] = {
    "fixed8": {"fixed_bits": 8},
    "fixed4": {"fixed_bits": 4},
    "granular-dq": {},
    "controller-only": {"e2b": False, "atc": False},
    "e2b": {"atc": False},
    FP_PATCHWISE: {},
}
MAIN = ("fixed8", "fixed4", "granular-dq")
ABLATION_NET = "imdn"
# The paper's Table 3 rows: none (fixed 8 bits), +GBC, +GBC+E2B, +GBC+E2B+ATC.
ABLATION = (
    ("fixed8", "none (8 bits)"),
    ("controller-only", "+GBC"),
    ("e2b", "+GBC+E2B"),
    ("granular-dq", "+GBC+E2B+ATC"),
)
PLAN: list[tuple[str, str]] = (
    [(name, v) for name in NETWORKS for v in MAIN]
    + [(ABLATION_NET, v) for v, _ in ABLATION if v not in MAIN]
    + [(name, FP_PATCHWISE) for name in NETWORKS]
)
# ../shared/reference/papers.md section 3.4 [GDQ-paper], EDSR x4, Urban100 (FAB, PSNR, SSIM): Table 1 and Table 3.
PAPER_FP = (32.00, 26.03, 0.784)
PAPER_TABLE3 = {
    "none (8 bits)": (8.00, 26.01, 0.783),
    "+GBC": (5.86, 25.97, 0.782),
    "+GBC+E2B": (5.51, 26.02, 0.784),
    "+GBC+E2B+ATC": (4.97, 26.01, 0.784),
}
SHORT = {"Set5": "S5", "Set14": "S14", "B100": "B100", "Urban100": "U100", "Manga109": "M109"}


def cell_key(name: str, variant: str) -> str:
    """Results key of one cell, e.g. `imdn|granular-dq`."""
    return f"{name}|{variant}"


def parse_only(text: str) -> list[tuple[str, str]]:
    """`NAME[:VARIANT],...` -> cells; without VARIANT, that network's planned cells."""
    cells = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) not in (1, 2) or not parts[0]:
            raise SystemExit(f"--only: expected NAME[:VARIANT], got {item!r}")
        if len(parts) == 2:
            if parts[1] not in VARIANTS:
                raise SystemExit(f"--only: unknown variant {parts[1]!r}; choose from {', '.join(VARIANTS)}")
            cells.append((parts[0], parts[1]))
        else:
            cells += [(n, v) for n, v in PLAN if n == parts[0]] or [(parts[0], v) for v in MAIN]
    return cells


def _image_record(entry: dict) -> dict[str, object]:
    """One image's bit log in compact form: FAB, LR size `HxW` and the patch bits in `patch_boxes` order."""
    patches = entry["patches"]
    height = max(p["top"] + p["height"] for p in patches)
    width = max(p["left"] + p["width"] for p in patches)
    boxes = [(p["top"], p["left"], p["height"], p["width"]) for p in patches]
    if boxes != patch_boxes(height, width, PATCH, STEP):
        raise SystemExit("patch-wise evaluation no longer uses 96 px patches with step 90: update PATCH/STEP")
    return {"fab": entry["fab"], "lr": f"{height}x{width}", "bits": " ".join(str(p["bit"]) for p in patches)}


def _bit_share(images: dict[str, dict]) -> dict[str, float]:
    """Share of all patches of a dataset that ran at each bit."""
    bits = [int(b) for rec in images.values() for b in str(rec["bits"]).split()]
    return {str(b): bits.count(b) / len(bits) for b in sorted(set(bits))}


def run_cell(
    name: str, variant: str, assets: str | None, preset: str, datasets: list[str], iterations: int | None
) -> dict:
    """Quantize one network by Granular-DQ with one variant's switches, save it, evaluate the checkpoint like `eval`."""
    if variant == FP_PATCHWISE:
        return run_fp_patchwise(name, assets, datasets)
    root = Path(assets) if assets else None
    model = load_model(name, SCALE, assets)
    calib = (root / "calibration" / "train291") if root else Path("calibration/train291")
    datasets_root = root / "datasets" if root else None
    overrides = dict(VARIANTS[variant])
    if iterations is not None:
        overrides["iterations"] = iterations
    start = time.perf_counter()
    spec = QuantSpec(8, 8, weight_granularity=WEIGHT_GRANULARITY)
    result = quantize_model(
        model, get_entry(name).layout, "granular-dq", spec, calib, preset, datasets_root, **overrides
    )
    train_seconds = time.perf_counter() - start
    cost = model_cost(result.network, SCALE)  # size; BitOPs here are at the widest bit (measured ones: per image)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}_{variant}.pt"
        file_bytes = result.save(path, {"variant": variant})
        evaluation = evaluate_model(
            path, SCALE, datasets, ("basicsr",), assets, device="cpu", progress=False, record_bits=True
        )
    scores = {}
    for r in evaluation.results:
        images = {image: _image_record(entry) for image, entry in evaluation.bits[r.dataset].items()}
        fabs = [float(rec["fab"]) for rec in images.values()]  # type: ignore[arg-type]
        scores[r.dataset] = {
            "psnr": r.psnr,
            "ssim": r.ssim,
            "fab": r.extras["fab"],
            "bitops_g": r.extras["bitops_g"],
            "fab_min": min(fabs),
            "fab_max": max(fabs),
            "bit_share": _bit_share(images),
            "images": r.images,
            "eval_seconds": r.seconds,
            "per_image": images,
        }
    config = result.settings["granular_dq"]
    return {
        "variant": variant,
        "switches": {k: config[k] for k in ("e2b", "atc", "fixed_bits")},  # type: ignore[index]
        "iterations": config["iterations"],  # type: ignore[index]
        "iterations_override": iterations,
        "settings": result.settings,  # the Granular-DQ config used, the crop and entropy-patch sizes
        "train_seconds": train_seconds,  # wall time of quantize_model: crops, calibration, training
        "rollbacks": result.rollbacks,
        "thresholds": result.state["controller"]["thresholds"].tolist() if result.state else None,
        "size_mb": cost.size_mb,
        "fp_size_mb": cost.fp_size_mb,
        "file_mb": file_bytes / 1e6,
        "fp_ops_g": cost.fp_ops_g,
        "scores": scores,
        "quantized": result.report.summary(),
    }


class FloatPatchwise(nn.Module):
    """A float network run on the evaluation's patches (PATCH px, step STEP, overlaps averaged), image by image."""

    supports_tiling = False  # it always runs patch-wise

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network
        self.scale = int(network.scale)

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        return torch.cat([patchwise(self.network, None, image, PATCH, STEP)[0] for image in lr.split(1)])


def run_fp_patchwise(name: str, assets: str | None, datasets: list[str]) -> dict:
    """The float network run on the evaluation's 96 px patches (step 90, overlaps averaged), no quantization."""
    model = FloatPatchwise(load_model(name, SCALE, assets))
    results = evaluate(model, datasets, SCALE, ["basicsr"], assets, progress=False)
    scores = {
        r.dataset: {"psnr": r.psnr, "ssim": r.ssim, "images": r.images, "eval_seconds": r.seconds} for r in results
    }
    return {"variant": FP_PATCHWISE, "iterations": None, "scores": scores}


def is_done(cell: dict | None, datasets: list[str], iterations: int | None) -> bool:
    """Whether a stored cell covers these datasets at the wanted training length (None for the FP cell)."""
    if cell is None or any(ds not in cell["scores"] for ds in datasets):
        return False
    return cell["variant"] == FP_PATCHWISE or cell["iterations"] == iterations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", default=None)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--only", default=None, help="comma list of NAME[:VARIANT] cells (default: the plan)")
    parser.add_argument("--datasets", default=",".join(DATASETS), help="comma list (default: the four benchmarks)")
    parser.add_argument(
        "--results", type=Path, default=None, help="results JSON (default docs/results/granular_<preset>.json)"
    )
    parser.add_argument("--table-only", action="store_true", help="write the table from the results file")
    parser.add_argument(
        "--iterations", type=int, default=None, help="training iterations, schedule stretched (recorded)"
    )
    parser.add_argument("--bitmaps", type=Path, default=None, help="write bit maps of two Urban100 images here")
    args = parser.parse_args()
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    plan = parse_only(args.only) if args.only else PLAN
    default_store = RESULTS / f"granular_{args.preset}.json"
    store: Path = args.results or default_store
    wanted = (
        args.iterations if args.iterations is not None else get_method("granular-dq").config(args.preset).iterations
    )
    for name, variant in [] if args.table_only else plan:
        fp = load_json(store).get(f"{name}|fp", {})
        if any(ds not in fp for ds in datasets):
            update_json(store, f"{name}|fp", {**fp, **fp_scores(name, SCALE, datasets, args.assets)})
        key = cell_key(name, variant)
        if is_done(load_json(store).get(key), datasets, wanted):
            continue
        start = time.perf_counter()
        cell = run_cell(name, variant, args.assets, args.preset, datasets, args.iterations)
        cell["cell_seconds"] = time.perf_counter() - start
        update_json(store, key, cell)
        first = cell["scores"][datasets[0]]
        bits = f"FAB {first['fab']:.2f}  train {cell['train_seconds']:.0f}s" if "fab" in first else "FP patch-wise"
        print(
            f"{key:<24} {datasets[0]} {first['psnr']:.2f}/{first['ssim']:.4f} {bits}  cell {cell['cell_seconds']:.0f}s"
            f"  rollbacks {len(cell.get('rollbacks', []))}",
            flush=True,
        )
    done = load_json(store)
    out = store.with_suffix(".md")
    snippet = write_bitmaps(done, args.bitmaps, args.assets) if args.bitmaps else None
    canonical = store.resolve() == default_store.resolve()
    produced_by = f"python benchmarks/granular_table.py --assets ../shared/assets --preset {args.preset}"
    default_snippet = RESULTS / "bitmaps" / f"granular_{ABLATION_NET}_x{SCALE}.md"
    snippet = snippet or (default_snippet if default_snippet.is_file() else None)
    write_table(done, args.preset, datasets, out, produced_by if canonical else None, snippet)


def write_bitmaps(done: dict, folder: Path, assets: str | None) -> Path | None:
    """Bit maps (srquant's `bit_map`) of the lowest- and highest-FAB Urban100 images of the imdn granular-dq cell."""
    cell = done.get(cell_key(ABLATION_NET, "granular-dq"))
    images = cell["scores"].get("Urban100", {}).get("per_image") if cell else None
    if not images:
        print(f"--bitmaps: no Urban100 results for {cell_key(ABLATION_NET, 'granular-dq')} yet; no bit maps written")
        return None
    ranked = sorted(images, key=lambda n: (images[n]["fab"], n))
    chosen = list(dict.fromkeys([ranked[0], ranked[-1]]))
    bench = BenchmarkSet.from_assets("Urban100", assets)
    paths = {p.stem: p for p in bench.image_paths()}
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"# Granular-DQ bit maps: {ABLATION_NET} x{SCALE}, Urban100", ""]
    legend = ", ".join(f"{b} bits #{''.join(f'{c:02x}' for c in rgb)}" for b, rgb in PALETTE.items())
    lines.append(
        f"Each {PATCH} px LR patch (step {STEP}, later patches drawn over earlier ones where they overlap) tinted by "
        f"the activation bit it ran at ({legend}), over the LR image. Results cell "
        f"`{cell_key(ABLATION_NET, 'granular-dq')}`: its lowest- and highest-FAB Urban100 images.\n"
    )
    for name in chosen:
        rec = images[name]
        height, width = (int(v) for v in str(rec["lr"]).split("x"))
        bits = [int(b) for b in str(rec["bits"]).split()]
        boxes = patch_boxes(height, width, PATCH, STEP)
        lr = bench.lr_for(paths[name], read_image(paths[name]), SCALE)
        if lr.shape[:2] != (height, width) or len(boxes) != len(bits):
            raise SystemExit(f"--bitmaps: {name}: the stored bits do not fit its LR image {lr.shape[1]}x{lr.shape[0]}")
        file = folder / f"{ABLATION_NET}_x{SCALE}_{name}.png"
        write_image(file, bit_map(lr, [PatchBit(*box, bit) for box, bit in zip(boxes, bits, strict=True)]))
        lines.append(f"![{name}: FAB {rec['fab']:.2f}]({file.name})\n")
        lines.append(f"`{name}` ({width}x{height} LR): FAB {rec['fab']:.2f}, patch bits {' '.join(map(str, bits))}\n")
    snippet = folder / f"granular_{ABLATION_NET}_x{SCALE}.md"
    snippet.write_text("\n".join(lines))
    print(f"wrote {len(chosen)} bit maps and {snippet}")
    return snippet


def _scores(cell: dict, ref: dict, datasets: list[str]) -> list[str]:
    """`PSNR/SSIM (delta)` per dataset against `ref`'s PSNR; `-` where the cell lacks the dataset."""
    out = []
    for d in datasets:
        got = cell["scores"].get(d)
        delta = f" ({got['psnr'] - ref[d]['psnr']:+.2f})" if got and d in ref else ""
        out.append(f"{got['psnr']:.2f}/{got['ssim']:.4f}{delta}" if got else "-")
    return out


def _per_dataset(cell: dict, datasets: list[str], field: str) -> str:
    """One number per dataset, `/`-joined in dataset order."""
    return "/".join(f"{cell['scores'][d][field]:.2f}" if d in cell["scores"] else "-" for d in datasets)


def _share(cell: dict, dataset: str) -> str:
    """`4:52% 5:20% ...`: the patches of one dataset per bit."""
    share = cell["scores"].get(dataset, {}).get("bit_share")
    return " ".join(f"{b}:{100 * v:.0f}%" for b, v in share.items()) if share else "-"


def write_table(
    done: dict,
    preset: str,
    datasets: list[str],
    out: Path,
    produced_by: str | None,
    bitmaps: Path | None = None,
) -> None:
    """Markdown: FP/fixed8/fixed4/Granular-DQ per network, the IMDN ablation (Table 3's shape), the paper for scale."""
    lines = [header(f"Granular-DQ, x{SCALE}, BasicSR convention, preset `{preset}`", produced_by), ""]
    iterations = get_method("granular-dq").config(preset).iterations
    odd = [f"`{k}` ({c['iterations']})" for k, c in done.items() if c.get("iterations") not in (None, iterations)]
    if odd:
        lines.append(
            f"**Trained for other than the preset's {iterations} iterations (its LR milestones and first epoch "
            f"stretched in proportion): {', '.join(odd)}.**\n"
        )
    lines.append(
        "Cells are resumable and may be run by workers with `--only NAME[:VARIANT],...`, one torch thread each, "
        "sharing the cores: training times are upper bounds.\n"
    )
    lines.append(
        "All quantized rows: body convs only (head, upsampler and tail FP), 8-bit LSQ weights, LSQ activations, QAT "
        "(L1 to HR crops) with the same preset schedule and batches, saved and evaluated from the checkpoint as "
        f"`srquant eval` does: patch-wise, {PATCH} px LR patches with step {STEP}, overlaps averaged. `fixed8` / "
        "`fixed4`: every patch at 8 / 4 bits (`fixed_bits`), one LSQ activation quantizer per layer, no controller. "
        "`granular-dq`: GBC {4, 6, 8} + E2B {4, 5, 8} + ATC (defaults). FP: the float network on whole images "
        "(`docs/results/zoo_fp.json`); `FP patch-wise`: the float network on the same patches, which shows what "
        "patch-wise inference alone costs.\n"
    )
    lines.append(
        "Drop = PSNR - whole-image FP PSNR. FAB: mean patch bit per image, averaged over the images (in dataset "
        "order, `/`-separated). BitOPs: G, MACs-based, for a 1280x720 output split between the bits in the "
        "proportions of each image's patch pixels (FP modules at 32/32), averaged over the images; the FP row gives "
        "the float MACs. Train s: wall time of `quantize_model` (crops, calibration, training).\n"
    )
    names = "/".join(SHORT.get(d, d) for d in datasets)
    cols = " | ".join(f"{d} PSNR/SSIM (drop)" for d in datasets)
    lines.append(f"| model | method | {cols} | FAB {names} | BitOPs G {names} | train s | size MB | rollbacks |")
    lines.append("|---" * (7 + len(datasets)) + "|")
    for name in NETWORKS:
        fp = done.get(f"{name}|fp")
        cells = [(v, done.get(cell_key(name, v))) for v in MAIN]
        if not fp or not any(c for _, c in cells):
            continue
        fp_ops = next((c["fp_ops_g"] for _, c in cells if c), None)
        fp_cells = " | ".join(f"{fp[d]['psnr']:.2f}/{fp[d]['ssim']:.4f}" if d in fp else "-" for d in datasets)
        lines.append(f"| {name} | FP | {fp_cells} | 32 | {f'{fp_ops:.2f}' if fp_ops else '-'} | - | - | - |")
        patched = done.get(cell_key(name, FP_PATCHWISE))
        if patched:
            lines.append(
                f"| {name} | FP patch-wise | {' | '.join(_scores(patched, fp, datasets))} | 32 | - | - | - | - |"
            )
        for variant, cell in cells:
            if cell is None:
                continue
            lines.append(
                f"| {name} | {variant} | {' | '.join(_scores(cell, fp, datasets))} | "
                f"{_per_dataset(cell, datasets, 'fab')} | {_per_dataset(cell, datasets, 'bitops_g')} | "
                f"{cell['train_seconds']:.0f} | {cell['size_mb']:.3f} | {len(cell['rollbacks'])} |"
            )
    rows = [(v, label, done.get(cell_key(ABLATION_NET, v))) for v, label in ABLATION]
    last = datasets[-1]
    if any(c for v, _, c in rows if v not in MAIN):
        lines += ["", f"## Ablation: {ABLATION_NET} x{SCALE} (the shape of the paper's Table 3)", ""]
        lines.append(
            "Delta = PSNR - the `fixed8` cell's PSNR. GBC = the controller picks {4, 6, 8} per patch; E2B re-codes "
            "its 8-bit patches by entropy to {4, 5, 8}; ATC moves the entropy thresholds by EMA in the first epoch "
            f"(otherwise they stay at the calibration quantiles). Bits: share of the {last} patches at each bit.\n"
        )
        cols = " | ".join(f"{d} PSNR/SSIM (delta)" for d in datasets)
        lines.append(f"| configuration | cell | {cols} | FAB {names} | bits ({SHORT.get(last, last)}) | train s |")
        lines.append("|---" * (5 + len(datasets)) + "|")
        fixed = done.get(cell_key(ABLATION_NET, "fixed8"))
        for variant, label, cell in rows:
            if cell is None:
                continue
            scores = _scores(cell, fixed["scores"] if fixed else {}, datasets)
            lines.append(
                f"| {label} | {variant} | {' | '.join(scores)} | {_per_dataset(cell, datasets, 'fab')} | "
                f"{_share(cell, last)} | {cell['train_seconds']:.0f} |"
            )
        lines += ["", "The paper's Table 3 (EDSR x4, Urban100, 300K iterations on DIV2K), for comparison:", ""]
        lines.append("| configuration | FAB | Urban100 PSNR/SSIM |")
        lines.append("|---|---|---|")
        for label, (fab, psnr, ssim) in PAPER_TABLE3.items():
            lines.append(f"| {label} | {fab:.2f} | {psnr:.2f}/{ssim:.3f} |")
    fab, psnr, ssim = PAPER_TABLE3["+GBC+E2B+ATC"]
    lines += ["", "## For scale", ""]
    lines.append(
        f"Paper (`../shared/reference/papers.md` section 3.4, Table 1, EDSR x4, not these networks, 300K iterations "
        f"on DIV2K, EDSR-PyTorch convention): Granular-DQ FAB {fab:.2f}, Urban100 {psnr:.2f}/{ssim:.3f} vs FP "
        f"{PAPER_FP[1]:.2f}/{PAPER_FP[2]:.3f} ({psnr - PAPER_FP[1]:+.2f} dB); the 8-bit row (PAMS) "
        f"{PAPER_TABLE3['none (8 bits)'][1]:.2f}. The preset here trains for {iterations} iterations.\n"
    )
    if bitmaps is not None:
        lines.append(f"Bit maps: [{bitmaps.name}]({os.path.relpath(bitmaps, out.parent)}).\n")
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    run_main(main)
