"""Shared test fixtures: where the shipped assets are, and a private cache for generated files."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ASSETS = Path(os.environ.get("SRQUANT_ASSETS") or Path(__file__).resolve().parents[2] / "shared" / "assets")
HAVE_ASSETS = (ASSETS / "weights").is_dir() and (ASSETS / "datasets").is_dir()
SKIP_REASON = f"needs the shipped weights and benchmark images: {ASSETS} not found (set SRQUANT_ASSETS)"


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Generated LR images go to a per-session cache unless the caller chose one."""
    if not os.environ.get("SRQUANT_CACHE"):
        os.environ["SRQUANT_CACHE"] = str(tmp_path_factory.mktemp("srquant-cache"))


@pytest.fixture
def assets() -> Path:
    """The shipped asset directory; the test is skipped, saying why, when it is absent."""
    if not HAVE_ASSETS:
        pytest.skip(SKIP_REASON)
    return ASSETS


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A throwaway HTTP server on 127.0.0.1 serving a folder; yields (base url, folder)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = partial(SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()
