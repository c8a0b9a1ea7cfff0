"""The model zoo: every entry builds, strict loading names mismatched keys, downloads go through sha256."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
from pathlib import Path

import pytest
import torch

from srquant.errors import SrquantError
from srquant.models import registry
from srquant.models.registry import REGISTRY, build_model, create_model, get_entry


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_entry_has_a_working_tiny_variant(name: str) -> None:
    entry = REGISTRY[name]
    for scale in entry.scales:
        model = build_model(name, scale, tiny=True).eval()
        with torch.no_grad():
            out = model(torch.rand(1, 3, 11, 9))
        assert out.shape == (1, 3, 11 * scale, 9 * scale)
        assert model.scale == scale and model.pad_multiple >= 1 and model.stage_names


def test_unknown_model_and_wrong_scale() -> None:
    with pytest.raises(SrquantError, match="unknown model 'vdsr'; known: imdn"):
        get_entry("vdsr")
    with pytest.raises(SrquantError, match="eswt supports x4, not x2"):
        build_model("eswt", 2)


def test_mismatched_checkpoint_names_the_keys(tmp_path: Path) -> None:
    path = tmp_path / "pan.pth"
    torch.save(build_model("pan", 4, tiny=True).state_dict(), path)
    with pytest.raises(SrquantError) as info:
        create_model("imdn", 4, tiny=True, weights=path)
    message = str(info.value)
    assert "missing keys:" in message and "unexpected keys:" in message and "\n" not in message


def test_shape_mismatch_is_named(tmp_path: Path) -> None:
    path = tmp_path / "imdn_x2.pth"
    torch.save(build_model("imdn", 2, tiny=True).state_dict(), path)
    with pytest.raises(SrquantError, match="shape mismatch: upsampler"):
        create_model("imdn", 4, tiny=True, weights=path)


def test_non_checkpoint_and_pickled_objects_are_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a zip or pickle")
    with pytest.raises(SrquantError, match="is not a PyTorch checkpoint$"):
        create_model("imdn", 4, tiny=True, weights=junk)
    evil = tmp_path / "evil.pth"
    torch.save({"obj": argparse.Namespace(payload=1)}, evil)  # arbitrary objects need full unpickling
    with pytest.raises(SrquantError, match="holds objects other than tensors") as caught:
        create_model("imdn", 4, tiny=True, weights=evil)
    assert "weights_only" not in str(caught.value)  # never a hint to turn the safety off


def test_saved_weights_round_trip(tmp_path: Path) -> None:
    model = build_model("swinir-light", 2, tiny=True).eval()
    path = tmp_path / "w.pth"
    torch.save({"params": model.state_dict()}, path)
    again = create_model("swinir-light", 2, tiny=True, weights=path)
    x = torch.rand(1, 3, 10, 10)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_missing_checkpoint_is_downloaded_and_verified(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    url, root = request.getfixturevalue("served")
    state = build_model("pan", 4).state_dict()
    torch.save(state, root / "pan.pth")
    digest = hashlib.sha256((root / "pan.pth").read_bytes()).hexdigest()
    entry = REGISTRY["pan"]
    ckpt = dataclasses.replace(entry.checkpoints[4], filename="pan-test.pth", url=f"{url}/pan.pth", sha256=digest)
    monkeypatch.setitem(REGISTRY, "pan", dataclasses.replace(entry, checkpoints={4: ckpt}))
    monkeypatch.setenv("SRQUANT_CACHE", str(tmp_path / "cache"))
    empty_assets = tmp_path / "assets"
    empty_assets.mkdir()
    with pytest.raises(SrquantError, match="pass --download"):
        create_model("pan", 4, assets=empty_assets)
    model = create_model("pan", 4, assets=empty_assets, allow_download=True)
    assert torch.equal(model.state_dict()["conv_first.weight"], state["conv_first.weight"])
    assert (tmp_path / "cache" / "weights" / "pan-test.pth").is_file()
    # A file that no longer matches the registry's checksum is refused, not silently used.
    (tmp_path / "cache" / "weights" / "pan-test.pth").write_bytes(b"corrupted")
    with pytest.raises(SrquantError, match="does not match"):
        create_model("pan", 4, assets=empty_assets)
    assert registry.get_entry("pan").checkpoints[4].filename == "pan-test.pth"
