"""Every method on a device: quantize a tiny network there, save, load onto it (and onto the CPU), evaluate.

The CUDA cases are skipped where no GPU exists; the CPU cases run the same steps everywhere.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from srquant.data.benchmark import BenchmarkSet
from srquant.evaluate import evaluate_dataset
from srquant.methods.pipeline import load_quantized, quantize_model
from srquant.models.registry import build_model, get_entry
from srquant.quant.spec import QuantSpec

CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))

SMALL = {  # each method's schedule cut to a few steps
    "minmax": {"calib_count": 4, "calib_size": 16, "calib_batch": 2},
    "percentile": {"calib_count": 4, "calib_size": 16, "calib_batch": 2},
    "dobi": {"calib_count": 4, "calib_size": 16, "calib_batch": 2},
    "2dquant": {"calib_count": 4, "calib_size": 16, "calib_batch": 2, "crop": 16, "iterations": 3, "batch_size": 2},
    "recon": {
        "calib_count": 4,
        "calib_size": 16,
        "calib_batch": 2,
        "iterations": 3,
        "batch_size": 2,
        "e2e_iterations": 2,
        "e2e_batch": 2,
        "e2e_crop": 16,
        "e2e_check_count": 2,
    },
    "dbdc-pac": {"calib_batches": 2, "calib_batch": 2, "calib_size": 16, "iterations": 3, "crop": 16},
    "adabm": {"epochs": 3, "iterations": 2, "crop": 16, "calib_count": 4, "calib_batch": 2, "guard_seed_batches": 2},
    "granular-dq": {
        "iterations": 3,
        "batch_size": 2,
        "patch": 16,
        "calib_count": 4,
        "calib_batch": 2,
        "guard_seed_batches": 2,
        "entropy_patch": 16,
    },
}


def _images(folder: Path, count: int, side: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(count):
        base = rng.integers(0, 256, (side // 8, side // 8, 3), dtype=np.uint8)
        Image.fromarray(base).resize((side, side), Image.BICUBIC).save(folder / f"{i}.png")
    return folder


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("method", sorted(SMALL))
def test_method_quantize_save_load_eval_on_a_device(method: str, device: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    calib = _images(tmp_path / "train", 3, 160, 0)
    bench = BenchmarkSet("toy", _images(tmp_path / "toy" / "HR", 2, 96, 1), tmp_path / "cache")
    network = build_model("imdn", 2, tiny=True).eval().to(device)
    spec = QuantSpec(8, 8) if method == "granular-dq" else QuantSpec(4, 4)
    result = quantize_model(network, get_entry("imdn").layout, method, spec, calib, "cpu", **SMALL[method])
    assert all(p.device.type == device for p in result.model.parameters())  # quantizers and controllers too
    assert all(b.device.type == device for b in result.model.buffers())
    result.save(tmp_path / "q.pt")
    here = load_quantized(tmp_path / "q.pt", device=device)
    on_cpu = load_quantized(tmp_path / "q.pt", device="cpu")
    x = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(result.model(x.to(device)), here(x.to(device)))  # bit-identical on the same device
        assert torch.allclose(here(x.to(device)).cpu(), on_cpu(x), atol=0.02)  # and the same model on the CPU
    (score,) = evaluate_dataset(here, bench, 2, progress=False)
    (cpu_score,) = evaluate_dataset(on_cpu, bench, 2, progress=False)
    assert score.psnr == pytest.approx(cpu_score.psnr, abs=0.5) and np.isfinite(score.psnr)
