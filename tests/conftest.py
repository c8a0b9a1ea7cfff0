"""Shared test fixtures: where the shipped assets are, a private cache for generated files, hook counters, folders
of random images."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from srquant.metrics.complexity import HOOK_NAMES

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


class CallCounter(nn.Module):
    """Identity that counts how often it is called, to check where an attention hook sits."""

    def __init__(self) -> None:
        """Start at zero calls."""
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Count the call and pass ``x`` through unchanged."""
        self.calls += 1
        return x


HookCounters = list[dict[str, CallCounter]]


def _count_hook_calls(model: nn.Module, attention_type: type[nn.Module]) -> HookCounters:
    """Replace the identity hooks of every ``attention_type`` module in ``model`` by call counters.

    Returns, per attention module in ``model.modules()`` order, its counters keyed by hook name
    (``srquant.metrics.complexity.HOOK_NAMES``). Each hook must still be the ``nn.Identity`` the contract asks for.
    """
    counters: HookCounters = []
    for module in model.modules():
        if not isinstance(module, attention_type):
            continue
        own = {}
        for name in HOOK_NAMES:
            hook = getattr(module, name)
            assert isinstance(hook, nn.Identity), f"{type(module).__name__}.{name} is {type(hook).__name__}"
            own[name] = CallCounter()
            setattr(module, name, own[name])
        counters.append(own)
    assert counters, f"no {attention_type.__name__} in {type(model).__name__}"
    return counters


@pytest.fixture
def noise_images(tmp_path: Path) -> Callable[..., Path]:
    """``make(count, height, width=height, width_step=0)``: a folder `train/` of random RGB PNGs (seed 0), image i
    `width + i * width_step` wide; calibration data that no test result may depend on in detail."""

    def make(count: int, height: int, width: int | None = None, width_step: int = 0) -> Path:
        folder = tmp_path / "train"
        folder.mkdir()
        rng = np.random.default_rng(0)
        for i in range(count):
            shape = (height, (width or height) + i * width_step, 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / f"{i}.png")
        return folder

    return make


@pytest.fixture
def count_hook_calls() -> Callable[[nn.Module, type[nn.Module]], HookCounters]:
    """``count(model, attention_type)``: swap the q/k/v/attn identity hooks for counters and return them."""
    return _count_hook_calls


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


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread for tests of tiny models: they gain nothing from threads and stall on a busy machine."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
