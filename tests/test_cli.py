"""The command line: eval with JSON, data lr, upscale, models, and one-line errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from srquant.cli import main
from srquant.data.io import read_image
from srquant.models.registry import build_model


def _error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("srquant: error: ") and "\n" not in err, err
    return err


def test_eval_writes_the_json_contract(assets: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.json"
    argv = ["eval", "--model", "imdn", "--scale", "4", "--datasets", "Set5", "--assets", str(assets)]
    assert main(argv + ["--convention", "basicsr,edsr", "--json", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "basicsr" in printed and "edsr" in printed
    record = json.loads(out.read_text())
    assert record["model"] == "imdn" and record["scale"] == 4
    rows = {r["convention"]: r for r in record["results"]}
    assert set(rows) == {"basicsr", "edsr"}
    for row in rows.values():
        assert row["dataset"] == "Set5" and row["images"] == 5 and row["seconds"] > 0
    assert abs(rows["basicsr"]["psnr"] - 32.21) <= 0.01 and abs(rows["basicsr"]["ssim"] - 0.8948) <= 0.0005


def test_data_lr_matches_the_shipped_images(assets: Path, tmp_path: Path) -> None:
    assert (
        main(["data", "lr", "--dataset", "Set5", "--scale", "3", "--out", str(tmp_path), "--assets", str(assets)]) == 0
    )
    shipped = sorted((assets / "datasets" / "Set5" / "LR_bicubic" / "X3").glob("*.png"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in shipped]
    for ref in shipped:
        assert np.array_equal(read_image(tmp_path / ref.name), read_image(ref))


def test_upscale_one_image_with_given_weights(tmp_path: Path) -> None:
    src, dst = tmp_path / "in.png", tmp_path / "out.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8)).save(src)
    # A random full-size PAN checkpoint made here, so this test needs no asset.
    full = tmp_path / "pan.pth"
    torch.save(build_model("pan", 2).state_dict(), full)
    argv = ["upscale", str(src), "-o", str(dst), "--model", "pan", "--scale", "2", "--weights", str(full)]
    assert main(argv) == 0
    assert read_image(dst).shape == (18, 14, 3)


def test_bad_inputs_give_one_line_errors(assets: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\ngarbage")
    base = ["--assets", str(assets)]
    err = _error_line(
        capsys, ["upscale", str(corrupt), "-o", str(tmp_path / "o.png"), "--model", "imdn", "--scale", "4"] + base
    )
    assert "corrupt.png" in err
    err = _error_line(capsys, ["eval", "--model", "eswt", "--scale", "2", "--datasets", "Set5"] + base)
    assert "eswt supports x4, not x2" in err
    pan = assets / "weights" / "PANx4_DF2K.pth"
    err = _error_line(capsys, ["eval", "--model", "imdn", "--scale", "4", "--weights", str(pan)] + base)
    assert "missing keys" in err and "unexpected keys" in err
    err = _error_line(capsys, ["eval", "--model", "imdn", "--scale", "4", "--assets", str(tmp_path / "no-such-dir")])
    assert "does not exist" in err
    err = _error_line(capsys, ["eval", "--model", "imdn", "--scale", "4", "--datasets", "Set99"] + base)
    assert "Set99" in err
    quantize = [
        "quantize",
        "--model",
        "imdn",
        "--scale",
        "4",
        "--wbits",
        "8",
        "--abits",
        "8",
        "-o",
        str(tmp_path / "q.pt"),
    ]
    err = _error_line(capsys, [*quantize, "--method", "2dquant", "--bias-correction"] + base)
    assert "bias_correction does not apply to 2dquant" in err and not (tmp_path / "q.pt").exists()


def test_models_lists_local_weights(assets: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--assets", str(assets)]) == 0
    lines = capsys.readouterr().out.splitlines()
    imdn = next(line for line in lines if line.startswith("imdn"))
    assert "x2,x3,x4" in imdn


def test_python_dash_m_runs() -> None:
    done = subprocess.run([sys.executable, "-m", "srquant", "--help"], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and "eval" in done.stdout


def test_eval_compare_fp_prints_the_drop_from_the_published_float_network(
    assets: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint, out = tmp_path / "q.pt", tmp_path / "q.json"
    quantize = ["quantize", "--model", "imdn", "--scale", "4", "--method", "minmax", "--wbits", "8", "--abits", "8"]
    assert main(quantize + ["--assets", str(assets), "-o", str(checkpoint), "--device", "cpu"]) == 0
    argv = ["eval", "--model", str(checkpoint), "--scale", "4", "--datasets", "Set5", "--assets", str(assets)]
    capsys.readouterr()
    assert main(argv + ["--compare-fp", "--json", str(out), "--no-progress", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "FP PSNR" in printed and "drop" in printed
    row = json.loads(out.read_text())["results"][0]
    assert abs(row["fp_psnr"] - 32.21) <= 0.01  # the published IMDN x4 weights, scored independently above
    assert row["drop_db"] == pytest.approx(row["psnr"] - row["fp_psnr"]) and row["drop_db"] < 0
    zoo = ["eval", "--model", "imdn", "--scale", "4", "--datasets", "Set5", "--assets", str(assets), "--compare-fp"]
    assert "is float" in _error_line(capsys, zoo)
