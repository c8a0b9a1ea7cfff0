"""Nothing a user owns is destroyed, and every failure is one line before the work starts.

Each case runs the CLI in-process and checks exit status 2, a single `srquant: error:` line, and that every
input file is byte-identical afterwards. The asset folder here is a small fake one (no shipped weights needed),
except where a case is about the real zoo networks.
"""

from __future__ import annotations

import hashlib
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import srquant
from srquant import api
from srquant.cli import main
from srquant.data.io import read_image, write_png_strips
from srquant.errors import SrquantError
from srquant.methods.pipeline import save_quantized
from srquant.methods.ptq import calibrate
from srquant.models import inference
from srquant.models.registry import build_model, get_entry
from srquant.quant.quantize import quantize_
from srquant.quant.spec import QuantSpec

pytestmark = pytest.mark.usefixtures("one_thread")


def _png(path: Path, height: int = 24, width: int = 20, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def _digests(*paths: Path) -> dict[Path, str]:
    """sha256 of every file under the given files and folders."""
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*")) if p.is_dir() else [])]
    return {f: hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}


def _fails(capsys: pytest.CaptureFixture[str], argv: list[str], *keep: Path) -> str:
    """Run the CLI, expect exit 2 with one `srquant: error:` line, and every kept file unchanged."""
    before = _digests(*keep)
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("srquant: error: "), err
    assert _digests(*keep) == before
    return err[0]


@pytest.fixture
def fake_assets(tmp_path: Path) -> Path:
    """An asset folder with a two-image Set5 and three training images."""
    root = tmp_path / "assets"
    for i in range(2):
        _png(root / "datasets" / "Set5" / "HR" / f"img{i}.png", 48, 40, i)
    for i in range(3):
        _png(root / "calibration" / "train291" / f"t{i}.png", 160, 160, 10 + i)
    (root / "weights").mkdir()
    return root


@pytest.fixture
def pan_weights(tmp_path: Path) -> Path:
    """Random full-size PAN x2 weights (a float checkpoint of the zoo architecture)."""
    path = tmp_path / "pan_x2.pth"
    torch.save(build_model("pan", 2).state_dict(), path)
    return path


@pytest.fixture
def quantized(tmp_path: Path) -> Path:
    """A tiny W8A8 IMDN x2 checkpoint."""
    torch.manual_seed(0)
    network = build_model("imdn", 2, tiny=True).eval()
    spec = QuantSpec(8, 8)
    quantize_(network, spec, get_entry("imdn").layout)
    calibrate(network, [torch.rand(2, 3, 16, 16)], "minmax")
    path = tmp_path / "q.pt"
    save_quantized(network, path, "minmax", spec, {})
    return path


# 1. Outputs never replace an input of the same command, never land in the asset folder.


def test_upscale_refuses_to_write_over_its_input(capsys, tmp_path: Path, pan_weights: Path) -> None:
    image = _png(tmp_path / "a.png")
    argv = ["upscale", str(image), "-o", str(image), "--model", "pan", "--scale", "2", "--weights", str(pan_weights)]
    assert "also an input" in _fails(capsys, argv, image, pan_weights)


def test_export_refuses_to_write_over_its_checkpoint(capsys, quantized: Path) -> None:
    err = _fails(capsys, ["export", "--model", str(quantized), "-o", str(quantized)], quantized)
    assert ".onnx" in err  # a checkpoint name is no ONNX file name: refused before anything is read


def test_export_refuses_an_onnx_name_that_is_its_input(capsys, quantized: Path, tmp_path: Path) -> None:
    alias = tmp_path / "q.onnx"
    alias.symlink_to(quantized)  # the same file under an ONNX name
    assert "also an input" in _fails(capsys, ["export", "--model", str(quantized), "-o", str(alias)], quantized)


def test_quantize_refuses_to_write_over_its_float_weights(capsys, tmp_path: Path, fake_assets: Path) -> None:
    weights = tmp_path / "imdn.pth"
    torch.save(build_model("imdn", 2).state_dict(), weights)
    argv = ["quantize", "--model", "imdn", "--scale", "2", "--method", "minmax", "--wbits", "8", "--abits", "8"]
    argv += ["--weights", str(weights), "-o", str(weights), "--assets", str(fake_assets), "--device", "cpu"]
    assert "also an input" in _fails(capsys, argv, weights, fake_assets)


def test_lr_images_never_land_in_the_asset_folder(capsys, fake_assets: Path) -> None:
    hr = fake_assets / "datasets" / "Set5" / "HR"
    argv = ["data", "lr", "--dataset", "Set5", "--scale", "2", "--assets", str(fake_assets), "--out"]
    assert "an input of this command" in _fails(capsys, argv + [str(hr)], fake_assets)
    assert "inside the asset folder" in _fails(capsys, argv + [str(fake_assets / "lr")], fake_assets)
    assert len(list(hr.iterdir())) == 2  # nothing was added: the next eval still scores 2 images


def test_replacing_an_earlier_output_is_said_in_one_line(capsys, tmp_path: Path, pan_weights: Path) -> None:
    image, out = _png(tmp_path / "a.png"), tmp_path / "out.png"
    argv = ["upscale", str(image), "-o", str(out), "--model", "pan", "--scale", "2", "--weights", str(pan_weights)]
    assert main(argv) == 0
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask  # written atomically, with the usual permissions
    capsys.readouterr()
    assert main(argv) == 0
    assert f"note: replacing {out}" in capsys.readouterr().err
    assert read_image(out).shape == (48, 40, 3)


# 2. Every output path is validated before any work.


@pytest.mark.parametrize("problem", ["directory", "read-only", "under-a-file", "extension"])
def test_bad_output_paths_are_one_line_before_any_work(
    problem: str, capsys, tmp_path: Path, pan_weights: Path, quantized: Path, fake_assets: Path
) -> None:
    image = _png(tmp_path / "in.png")
    folder = tmp_path / "existing"
    folder.mkdir()
    blocker = tmp_path / "blocker.txt"
    blocker.write_text("a regular file")
    locked = tmp_path / "locked"
    locked.mkdir()

    def target(name: str) -> str:
        if problem == "directory":
            return str(folder)
        if problem == "read-only":
            return str(locked / name)
        if problem == "under-a-file":
            return str(blocker / name)
        return str(tmp_path / (Path(name).stem + ".txt"))

    os.chmod(locked, 0o555)
    try:
        commands = [
            [
                "upscale",
                str(image),
                "-o",
                target("o.png"),
                "--model",
                "pan",
                "--scale",
                "2",
                "--weights",
                str(pan_weights),
            ],
            ["export", "--model", str(quantized), "-o", target("o.onnx")],
            ["eval", "--model", str(quantized), "--scale", "2", "--datasets", "Set5", "--json", target("o.json")],
            ["bench-speed", "--model", str(quantized), "--json", target("o.json")],
            ["quantize", "--model", "imdn", "--scale", "2", "--method", "minmax", "--wbits", "8", "--abits", "8"]
            + ["-o", target("o.pt"), "--device", "cpu"],
        ]
        if problem not in ("extension", "directory"):  # a folder output is a folder
            commands.append(["data", "lr", "--dataset", "Set5", "--scale", "2", "--out", target("lr")])
        for argv in commands:
            _fails(capsys, argv + ["--assets", str(fake_assets)], image, pan_weights, quantized, fake_assets)
        assert sorted(p.name for p in folder.iterdir()) == [] and sorted(locked.iterdir()) == []  # no .tmp left
    finally:
        os.chmod(locked, 0o755)


def test_json_outputs_must_differ(capsys, tmp_path: Path, quantized: Path, fake_assets: Path) -> None:
    same = str(tmp_path / "r.json")
    argv = ["eval", "--model", str(quantized), "--scale", "2", "--datasets", "Set5", "--assets", str(fake_assets)]
    assert "same file" in _fails(capsys, argv + ["--json", same, "--bits-json", same], quantized)


def test_an_incomplete_checkpoint_is_one_line(capsys, tmp_path: Path) -> None:
    partial = tmp_path / "partial.pt"
    torch.save({"format": "srquant-quantized/2", "method": "minmax"}, partial)
    assert "not a complete srquant checkpoint" in _fails(
        capsys, ["export", "--model", str(partial), "-o", str(tmp_path / "o.onnx")], partial
    )


def test_a_folder_output_that_is_a_file_is_refused(capsys, tmp_path: Path, fake_assets: Path) -> None:
    blocker = tmp_path / "out.txt"
    blocker.write_text("x")
    argv = ["data", "lr", "--dataset", "Set5", "--scale", "2", "--out", str(blocker), "--assets", str(fake_assets)]
    assert "is a file" in _fails(capsys, argv, blocker)


# 3. Non-finite weights or outputs; tiny inputs; 4. arrays and names.


def test_a_nan_weight_is_named_at_load(capsys, tmp_path: Path, fake_assets: Path) -> None:
    state = build_model("pan", 2).state_dict()
    state["conv_first.weight"][0, 0, 0, 0] = float("nan")
    bad = tmp_path / "nan.pth"
    torch.save(state, bad)
    image = _png(tmp_path / "a.png")
    argv = [
        "upscale",
        str(image),
        "-o",
        str(tmp_path / "o.png"),
        "--model",
        "pan",
        "--scale",
        "2",
        "--weights",
        str(bad),
    ]
    assert "conv_first.weight holds NaN/inf" in _fails(capsys, argv, image, bad)
    argv = ["eval", "--model", "pan", "--scale", "2", "--weights", str(bad), "--datasets", "Set5"]
    assert "conv_first.weight holds NaN/inf" in _fails(capsys, argv + ["--assets", str(fake_assets)], bad)


def test_a_quantized_checkpoint_with_a_nan_is_refused(capsys, tmp_path: Path, fake_assets: Path) -> None:
    torch.manual_seed(0)
    network = build_model("imdn", 2, tiny=True).eval()
    quantize_(network, QuantSpec(8, 8), get_entry("imdn").layout)
    calibrate(network, [torch.rand(2, 3, 16, 16)], "minmax")
    with torch.no_grad():
        network.get_submodule("fea_conv").bias[0] = float("inf")
    path = tmp_path / "nan.pt"
    save_quantized(network, path, "minmax", QuantSpec(8, 8), {})
    argv = ["eval", "--model", str(path), "--scale", "2", "--datasets", "Set5", "--assets", str(fake_assets)]
    assert "fea_conv.bias holds NaN/inf" in _fails(capsys, argv, path)


def test_a_network_that_outputs_nan_is_caught_after_inference(fake_assets: Path) -> None:
    class Broken(torch.nn.Module):
        scale = 2

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.interpolate(x, scale_factor=2) * float("nan")

    with pytest.raises(SrquantError, match="NaN/inf values on Set5/img0"):
        srquant.evaluate(Broken(), ["Set5"], 2, assets=fake_assets, progress=False)
    with pytest.raises(SrquantError, match="NaN/inf values on the image"):
        api.upscale_image(Broken(), np.zeros((8, 8, 3), np.uint8))


@pytest.mark.parametrize("name", ["imdn", "pan", "carn-m", "lmlt-tiny", "eswt"])
def test_tiny_inputs_give_a_flat_output_on_every_zoo_network(name: str, assets: Path) -> None:
    """A flat image stays (about) as flat as a large flat image does, down to 1x1 (padded as the network needs)."""
    model = srquant.load_model(name, 4, assets, device="cpu")

    def deviation(height: int, width: int) -> float:
        worst = 0.0
        for value in (25, 128, 230):
            sr = api.upscale_image(model, np.full((height, width, 3), value, np.uint8))
            assert sr.shape == (4 * height, 4 * width, 3)
            worst = max(worst, float(np.abs(sr.astype(int) - value).max()))
        return worst

    large = deviation(48, 48)
    for height, width in [(1, 1), (1, 3), (2, 2), (3, 5)]:
        assert deviation(height, width) <= large + 1


def test_arrays_are_validated_and_floats_need_their_range(pan_weights: Path) -> None:
    model = srquant.load_model("pan", 2, weights=pan_weights, device="cpu")
    image = np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    reference = api.upscale_image(model, image)
    as_float = api.upscale_image(model, image.astype(np.float32) / 255, value_range=1.0)
    assert np.abs(as_float.astype(int) - reference.astype(int)).max() <= 1
    for bad, match in [
        (image.astype(np.float32) / 255, "needs value_range=1.0"),
        (image.astype(np.uint16) * 257, "uint16"),
        (image[..., 0], "HxWx3"),
        (image.astype(np.float32), "finite values in \\[0, 1\\]"),
    ]:
        with pytest.raises(SrquantError, match=match):
            api.upscale_image(model, bad, value_range=1.0 if match.startswith("finite") else None)


def test_a_zoo_name_wins_over_a_file_of_the_same_name(monkeypatch, tmp_path: Path, capsys, assets: Path) -> None:
    monkeypatch.chdir(tmp_path)
    Path("pan").write_text("not a checkpoint")
    assert not api.is_checkpoint_reference("pan") and api.is_checkpoint_reference("./pan")
    argv = ["eval", "--model", "pan", "--scale", "4", "--datasets", "Set5", "--assets", str(assets), "--no-progress"]
    assert main(argv) == 0  # the zoo's PAN, not the file
    argv = ["eval", "--model", "./pan", "--scale", "4", "--assets", str(assets)]
    assert "is not a PyTorch checkpoint" in _fails(capsys, argv, Path("pan"))


# 5. Loading errors in srquant's words; decompression bombs; tiles.


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "is empty"), (b"hello, plain text\n", "is not a PyTorch checkpoint"), ("half", "truncated or corrupt")],
)
def test_unreadable_checkpoints_are_said_in_srquants_words(
    content: bytes | str, message: str, capsys, tmp_path: Path, quantized: Path, fake_assets: Path
) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(quantized.read_bytes()[: quantized.stat().st_size // 2] if content == "half" else content)
    argv = ["eval", "--model", str(bad), "--scale", "2", "--datasets", "Set5", "--assets", str(fake_assets)]
    err = _fails(capsys, argv, bad)
    assert message in err and "weights_only" not in err


def _bomb(path: Path, side: int = 20000) -> Path:
    """A PNG whose header claims side x side pixels (more than PIL's limit) with almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)))
    return path


def test_a_decompression_bomb_is_one_line(capsys, tmp_path: Path, pan_weights: Path, fake_assets: Path) -> None:
    bomb = _bomb(tmp_path / "bomb.png")
    out = tmp_path / "o.png"
    argv = ["upscale", str(bomb), "-o", str(out), "--model", "pan", "--scale", "2", "--weights", str(pan_weights)]
    assert "more than" in _fails(capsys, argv, bomb)
    calib = tmp_path / "calib"
    _bomb(calib / "bomb.png")
    _png(calib / "ok.png", 160, 160)
    argv = ["quantize", "--model", "pan", "--scale", "2", "--method", "minmax", "--wbits", "8", "--abits", "8"]
    argv += ["--weights", str(pan_weights), "--calib", str(calib), "-o", str(tmp_path / "q.pt")]
    assert "more than" in _fails(capsys, argv + ["--assets", str(fake_assets), "--device", "cpu"], calib)
    assert not out.exists() and not (tmp_path / "q.pt").exists()


@pytest.mark.parametrize("tile", [16, 17])
def test_a_tile_below_its_minimum_says_the_minimum(tile: int, capsys, tmp_path: Path, pan_weights: Path) -> None:
    image = _png(tmp_path / "a.png", 64, 64)
    argv = ["upscale", str(image), "-o", str(tmp_path / "o.png"), "--model", "pan", "--scale", "2"]
    err = _fails(capsys, argv + ["--weights", str(pan_weights), "--tile", str(tile)], image)
    assert "--tile must be at least 32" in err and "--tile-overlap" in err
    argv += ["--weights", str(pan_weights), "--tile", str(tile), "--tile-overlap", "4"]
    assert main(argv) == 0  # with a smaller overlap the same tile is fine


def test_an_untiled_run_that_would_not_fit_names_a_tile(capsys, monkeypatch, tmp_path: Path, pan_weights: Path) -> None:
    image = _png(tmp_path / "big.png", 600, 600)
    monkeypatch.setattr(inference, "_free_bytes", lambda device: 50 * 10**6)  # as if 50 MB were free
    argv = ["upscale", str(image), "-o", str(tmp_path / "o.png"), "--model", "pan", "--scale", "2"]
    err = _fails(capsys, argv + ["--weights", str(pan_weights)], image)
    assert "use --tile" in err and not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("suffix", [".png", ".bmp"])
def test_tiled_output_written_in_strips_equals_the_whole_tiled_image(
    suffix: str, tmp_path: Path, pan_weights: Path
) -> None:
    image = _png(tmp_path / "a.png", 70, 53)
    model = srquant.load_model("pan", 2, weights=pan_weights, device="cpu")
    out = api.upscale_file(model, image, tmp_path / f"o{suffix}", tile=32, overlap=8)
    whole = api.upscale_image(model, read_image(image), tile=32, overlap=8)
    assert np.array_equal(read_image(out), whole)


def test_png_strips_make_a_standard_png(tmp_path: Path) -> None:
    picture = np.random.default_rng(1).integers(0, 256, (37, 29, 3), dtype=np.uint8)
    write_png_strips(tmp_path / "p.png", 37, 29, [picture[:10], picture[10:11], picture[11:]])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "p.png").convert("RGB")), picture)
    with pytest.raises(SrquantError, match="rows"):
        write_png_strips(tmp_path / "short.png", 37, 29, [picture[:10]])
    assert not (tmp_path / "short.png").exists() and not list(tmp_path.glob("*.tmp*"))


def test_an_interrupted_write_leaves_nothing(monkeypatch, tmp_path: Path, quantized: Path) -> None:
    network = srquant.load_quantized(quantized)

    def interrupted(obj: object, path: object) -> None:
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_quantized(network, tmp_path / "out" / "q2.pt", "minmax", QuantSpec(8, 8), {})
    assert list((tmp_path / "out").iterdir()) == []
