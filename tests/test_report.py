"""`srquant report` on tiny models: the page parses, every image it references exists, and it renders."""

from __future__ import annotations

import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from srquant import api
from srquant.cli import main
from srquant.methods.pipeline import quantize_model
from srquant.models.registry import build_model, get_entry
from srquant.quant.spec import QuantSpec

pytestmark = pytest.mark.usefixtures("one_thread")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class _Page(HTMLParser):
    """Collects image sources, table rows and the text of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.rows = 0
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.images.append(dict(attrs)["src"] or "")
        if tag == "tr":
            self.rows += 1

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _png(path: Path, height: int, width: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    coarse = np.random.default_rng(seed).integers(0, 256, (height // 6 + 1, width // 6 + 1, 3), dtype=np.uint8)
    Image.fromarray(coarse).resize((width, height), Image.BICUBIC).save(path)


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, list]:
    """A small asset folder and three models: a tiny float IMDN x2, its W4A4 DOBI and its AdaBM checkpoints."""
    assets = tmp_path / "assets"
    for i in range(2):
        _png(assets / "datasets" / "Set5" / "HR" / f"img{i}.png", 60, 52, i)
    for i in range(3):
        _png(assets / "calibration" / "train291" / f"t{i}.png", 160, 160, 10 + i)
    torch.manual_seed(0)
    float_model = build_model("imdn", 2, tiny=True).eval()
    checkpoints = []
    for method, overrides in (
        ("dobi", {"calib_count": 4, "calib_size": 16}),
        ("adabm", {"epochs": 3, "iterations": 2, "crop": 16, "calib_count": 4, "calib_batch": 2}),
    ):
        network = build_model("imdn", 2, tiny=True).eval()
        network.load_state_dict(float_model.state_dict())
        folder = assets / "calibration" / "train291"
        result = quantize_model(network, get_entry("imdn").layout, method, QuantSpec(4, 4), folder, **overrides)
        path = tmp_path / f"{method}.pt"
        result.save(path)
        checkpoints.append(path)
    return assets, [float_model, *checkpoints]


def _parse(page: Path) -> _Page:
    parser = _Page()
    parser.feed(page.read_text())
    return parser


def test_the_report_page_parses_and_every_image_exists(setup, tmp_path: Path) -> None:
    assets, models = setup
    page = api.write_report(models, 2, ["Set5"], tmp_path / "report", assets, per_dataset=1, error_maps=True)
    parsed = _parse(page)
    assert parsed.rows == 1 + 3  # header + 3 models x 1 dataset
    assert parsed.images and all((page.parent / src).is_file() for src in parsed.images)
    crops = [src for src in parsed.images if not src.endswith(("_bits.png", "_error.png")) and "psnr_vs" not in src]
    assert len(crops) == 2 + 3  # HR, bicubic and the three models, for the one image shown
    assert any(src.endswith("_bits.png") for src in parsed.images)  # AdaBM's per-layer bits
    assert sum(src.endswith("_error.png") for src in parsed.images) == 4  # bicubic and the three models
    assert {"psnr_vs_bitops.png", "psnr_vs_size.png"} <= set(parsed.images)
    assert "0.010" in page.read_text()  # the quantized models' size in MB
    text = " ".join(parsed.text)
    assert "Command:" in text and "torch" in text and " dB" in text


def test_without_matplotlib_the_page_says_how_to_get_plots(setup, tmp_path: Path, monkeypatch) -> None:
    assets, models = setup
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    page = api.write_report(models[:2], 2, ["Set5"], tmp_path / "r", assets, images=["img1"])
    parsed = _parse(page)
    assert 'pip install "srquant[report]"' in page.read_text()
    assert not any("psnr_vs" in src for src in parsed.images)
    assert any(src.startswith("Set5_img1_") for src in parsed.images)  # the image asked for


def test_the_cli_writes_a_report_of_checkpoints(setup, tmp_path: Path, capsys) -> None:
    assets, models = setup
    out = tmp_path / "cli-report"
    argv = ["report", "--models", ",".join(str(m) for m in models[1:]), "--scale", "2", "--datasets", "Set5"]
    argv += ["-o", str(out), "--assets", str(assets), "--device", "cpu", "--no-progress", "--per-dataset", "1"]
    assert main(argv) == 0
    assert (out / "index.html").is_file() and "wrote" in capsys.readouterr().out


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian: apt-get install chromium)")
def test_headless_chromium_renders_a_page_that_is_not_blank(setup, tmp_path: Path) -> None:
    assets, models = setup
    page = api.write_report(models, 2, ["Set5"], tmp_path / "report", assets, per_dataset=1)
    shot = tmp_path / "shot.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
    flags += ["--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]
    command = [CHROMIUM, *flags, "--window-size=1200,1600", f"--screenshot={shot}", page.resolve().as_uri()]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.std() > 10  # text, tables and crops: far from a blank page
    assert (pixels < 128).mean() > 0.01
