"""The benchmarks' shared helpers: one-line errors and the header's machine line."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from srquant.errors import SrquantError

COMMON = Path(__file__).resolve().parents[1] / "benchmarks" / "common.py"


@pytest.fixture(scope="module")
def common() -> ModuleType:
    """benchmarks/common.py, loaded from its file (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("benchmark_common", COMMON)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_run_main_turns_a_library_error_into_one_line(common: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["input_ablation.py"])

    def failing() -> None:
        raise SrquantError("checkpoint not found: missing.pt")

    with pytest.raises(SystemExit) as stop:
        common.run_main(failing)
    assert str(stop.value.code) == "input_ablation.py: error: checkpoint not found: missing.pt"


def test_run_main_lets_other_errors_through(common: ModuleType) -> None:
    def broken() -> None:
        raise KeyError("a bug, not bad input")

    with pytest.raises(KeyError):
        common.run_main(broken)


def test_header_names_this_process_unless_the_cells_recorded_their_own(common: ModuleType) -> None:
    own = common.header("T", "cmd")
    assert f"- machine: {common.machine()}\n" in own
    cells = common.header("T", "cmd", "each cell's own, in `machine` of results.json")
    assert "- machine: each cell's own, in `machine` of results.json\n" in cells
    assert common.machine() not in cells
