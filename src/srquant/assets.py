"""Where srquant finds weights and datasets, and how it downloads a missing checkpoint safely.

The asset directory holds `weights/` and `datasets/` (and optionally `calibration/`). It is chosen, in order,
by an explicit argument (the CLI's `--assets`), the `SRQUANT_ASSETS` environment variable, or a per-user
cache directory. Generated files (LR images) go to a separate cache, because an asset directory may be
read-only.
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
from pathlib import Path

from srquant.errors import SrquantError
from srquant.outputs import atomic_write

ASSETS_ENV = "SRQUANT_ASSETS"
CACHE_ENV = "SRQUANT_CACHE"


def user_cache_dir() -> Path:
    """The per-user cache root: `$SRQUANT_CACHE`, else `$XDG_CACHE_HOME/srquant`, else `~/.cache/srquant`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "srquant"


def asset_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The asset directory to use; an explicitly named one must exist."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        source = "--assets"
    elif os.environ.get(ASSETS_ENV):
        path = Path(os.environ[ASSETS_ENV]).expanduser()
        source = ASSETS_ENV
    else:
        return user_cache_dir() / "assets"
    if not path.is_dir():
        raise SrquantError(f"asset directory {path} (from {source}) does not exist")
    return path


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so large files do not fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str | None) -> None:
    """Raise if the file's sha256 differs from the expected one (no-op when none is known)."""
    if expected is None:
        return
    actual = sha256_of(path)
    if actual != expected:
        raise SrquantError(f"{path}: sha256 {actual[:16]}... does not match the registry's {expected[:16]}...")


def download(url: str, dest: Path, sha256: str | None, timeout: float = 60.0) -> Path:
    """Download `url` to `dest` atomically: write a temp file beside it, verify the hash, then rename.

    A failed or mismatching download leaves no file at `dest`, so a later run never sees a partial file.
    """

    def fetch(tmp: Path) -> None:
        with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            while block := response.read(1 << 20):
                out.write(block)
        if sha256 is not None and (actual := sha256_of(tmp)) != sha256:
            raise SrquantError(f"download of {url} has sha256 {actual[:16]}..., expected {sha256[:16]}...")

    try:
        return atomic_write(dest, fetch)
    except OSError as err:
        raise SrquantError(f"could not download {url}: {err}") from err
