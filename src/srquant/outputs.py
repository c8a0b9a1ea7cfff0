"""Where outputs may go, checked before any work, and how every output file is written: atomically.

An output never replaces an input of the same command and never lands inside the asset folder (weights and
benchmark images); a path that is a directory, read-only, under a regular file, or has the wrong extension is
refused in one line before anything runs. Files are written to a temporary file in their own folder and renamed,
so an interrupted run leaves neither a partial file nor a temporary one. Replacing an existing output that is not
an input is allowed and said in one line.
"""

from __future__ import annotations

import logging
import os
import stat
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from srquant.errors import SrquantError

log = logging.getLogger(__name__)

KINDS: dict[str, tuple[str, ...]] = {
    "image": (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".ppm"),
    "checkpoint": (".pt", ".pth"),
    "onnx": (".onnx",),
    "json": (".json",),
    "html": (".html",),
}


def _read_only(path: Path) -> bool:
    """True when no write permission bit is set (refused even for root, who could write anyway)."""
    return not stat.S_IMODE(path.stat().st_mode) & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)


def _existing_ancestor(path: Path) -> Path:
    """The nearest ancestor of `path` that exists (where missing folders would be created)."""
    for parent in path.parents:
        if parent.exists():
            return parent
    return Path(path.anchor or ".")


def _is_within(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def _check_place(path: Path, inputs: Iterable[str | os.PathLike[str] | None], assets: Path | None) -> None:
    """Refuse an output that is an input, or lies inside the asset folder; and a place that cannot be written."""
    for given in inputs:
        if given is None:
            continue
        source = Path(given)
        if source.exists() and path.exists() and path.resolve() == source.resolve():
            raise SrquantError(f"{path} is also an input of this command; write the output elsewhere")
    if assets is not None and assets.is_dir() and _is_within(path, assets):
        raise SrquantError(f"{path} is inside the asset folder {assets}; write outputs elsewhere")
    ancestor = _existing_ancestor(path)
    if not ancestor.is_dir():
        raise SrquantError(f"cannot create {path}: {ancestor} is a file, not a folder")
    if _read_only(ancestor) or not os.access(ancestor, os.W_OK | os.X_OK):
        raise SrquantError(f"cannot write {path}: {ancestor} is read-only")


def check_output(
    path: str | os.PathLike[str],
    kind: str,
    inputs: Iterable[str | os.PathLike[str] | None] = (),
    assets: Path | None = None,
) -> Path:
    """Validate an output file path of one kind (image, checkpoint, onnx, json, html) before any work."""
    path = Path(path)
    suffixes = KINDS[kind]
    if path.is_dir():
        raise SrquantError(f"{path} is a folder; give a {kind} file name ({'/'.join(suffixes)})")
    if path.suffix.lower() not in suffixes:
        raise SrquantError(f"{path}: a {kind} output needs one of the extensions {', '.join(suffixes)}")
    _check_place(path, inputs, assets)
    if path.exists():
        if _read_only(path):
            raise SrquantError(f"cannot write {path}: the file is read-only")
        log.warning("replacing %s", path)
    return path


def check_output_folder(
    path: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str] | None] = (), assets: Path | None = None
) -> Path:
    """Validate an output folder before any work: not a file, not inside the assets, not an input, writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SrquantError(f"{path} is a file; give a folder for these outputs")
    for given in inputs:
        if given is not None and Path(given).exists() and path.exists() and _is_within(path, Path(given)):
            raise SrquantError(f"{path} is inside {given}, an input of this command; write the outputs elsewhere")
    _check_place(path / "probe", (), assets)
    if path.is_dir() and (_read_only(path) or not os.access(path, os.W_OK | os.X_OK)):
        raise SrquantError(f"cannot write into {path}: the folder is read-only")
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Create `path` by `write(temporary path)` in the same folder, then rename; nothing is left on failure.

    The temporary file keeps the final suffix, so writers that choose a format by extension (PIL) still do.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(handle)
    tmp = Path(name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it owner-only; the output gets the usual permissions
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write a text file atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))
