"""Asset directory resolution and checksum-verified, atomic downloads (served from 127.0.0.1 only)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from srquant.assets import asset_dir, download
from srquant.errors import SrquantError


def test_download_verifies_and_renames(served: tuple[str, Path], tmp_path: Path) -> None:
    url, root = served
    payload = b"weights" * 1000
    (root / "w.pth").write_bytes(payload)
    dest = tmp_path / "cache" / "w.pth"
    download(f"{url}/w.pth", dest, hashlib.sha256(payload).hexdigest())
    assert dest.read_bytes() == payload
    assert list(dest.parent.iterdir()) == [dest]  # no temporary file left behind


def test_checksum_mismatch_leaves_nothing(served: tuple[str, Path], tmp_path: Path) -> None:
    url, root = served
    (root / "w.pth").write_bytes(b"tampered")
    dest = tmp_path / "cache" / "w.pth"
    with pytest.raises(SrquantError, match="sha256"):
        download(f"{url}/w.pth", dest, "0" * 64)
    assert not dest.exists() and list(dest.parent.iterdir()) == []


def test_http_error_is_reported(served: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = served
    with pytest.raises(SrquantError, match="could not download"):
        download(f"{url}/missing.pth", tmp_path / "x.pth", None)


def test_asset_dir_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SRQUANT_ASSETS", str(tmp_path))
    assert asset_dir() == tmp_path
    assert asset_dir(tmp_path / ".") == tmp_path / "."
    with pytest.raises(SrquantError, match="does not exist"):
        asset_dir(tmp_path / "nowhere")
    monkeypatch.setenv("SRQUANT_ASSETS", str(tmp_path / "nowhere"))
    with pytest.raises(SrquantError, match="SRQUANT_ASSETS"):
        asset_dir()
