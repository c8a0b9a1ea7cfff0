"""Rules of the code base that keep one copy of each mechanism: a test reads the source, not the behaviour.

- Only `srquant.quant` derives a quantization grid (a step from bounds, a 2^bits level count) or branches on
  quantizer classes; everything else goes through the quantizer's grid interface.
- The pipeline, the CLI, the API and the checkpoint code never test a method's name or class: methods are plugins.
- Architectures never import quantization code.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import srquant
from srquant.methods.registry import method_names

SRC = Path(srquant.__file__).parent
QUANTIZER_CLASSES = {"Quantizer", "AsymmetricQuantizer", "SymmetricQuantizer", "LSQQuantizer", "MultiBitLSQ"}
QUANTIZER_PARAMETERS = {"lower_bound", "upper_bound", "qrange"}
METHOD_CLASSES = {
    "AdaBM",
    "AdaptiveBitsModel",
    "BitController",
    "GranularDQ",
    "GranularityBitController",
    "PatchwiseBitsModel",
    "RangeCalibration",
    "TwoDQuant",
}
PLUGIN_USERS = ["methods/pipeline.py", "methods/base.py", "methods/registry.py", "cli.py", "api.py"]


def _files(*, outside: str | None = None, only: list[str] | None = None) -> list[Path]:
    paths = sorted(SRC.rglob("*.py"))
    if only is not None:
        return [SRC / p for p in only] + sorted((SRC / "quant").glob("checkpoint.py"))
    return [p for p in paths if outside is None or outside not in p.relative_to(SRC).parts]


def _names(node: ast.AST) -> set[str]:
    """Every bare or dotted name inside an expression (`a.B` gives `B`)."""
    found = set()
    for child in ast.walk(node):
        if isinstance(child, ast.Name):
            found.add(child.id)
        elif isinstance(child, ast.Attribute):
            found.add(child.attr)
    return found


def _class_tests(tree: ast.AST) -> list[tuple[int, set[str]]]:
    """(line, class names) of every isinstance/issubclass/type() comparison."""
    hits = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("isinstance", "issubclass")
        ):
            hits.append((node.lineno, _names(node.args[1]) if len(node.args) > 1 else set()))
        if isinstance(node, ast.Compare) and any(
            isinstance(side, ast.Call) and isinstance(side.func, ast.Name) and side.func.id == "type"
            for side in [node.left, *node.comparators]
        ):
            hits.append((node.lineno, _names(node)))
    return hits


def _grid_derivations(tree: ast.AST) -> list[tuple[int, str]]:
    """Reads of quantizer parameters and 2 ** <bits> level counts."""
    hits = []
    called = {id(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in QUANTIZER_PARAMETERS:
            hits.append((node.lineno, node.attr))
        if isinstance(node, ast.Attribute) and node.attr == "step" and id(node) not in called:
            hits.append((node.lineno, "step"))  # a quantizer's step size (optimizer.step() is a call)
        if (
            isinstance(node, ast.BinOp)
            and isinstance(node.op, ast.Pow)
            and isinstance(node.left, ast.Constant)
            and node.left.value == 2
            and any("bit" in name.lower() for name in _names(node.right))
        ):
            hits.append((node.lineno, "2 ** bits"))
    return hits


@pytest.mark.parametrize("path", _files(outside="quant"), ids=lambda p: str(p.relative_to(SRC)))
def test_only_quant_derives_grids_or_branches_on_quantizer_classes(path: Path) -> None:
    tree = ast.parse(path.read_text())
    branches = [(line, names & QUANTIZER_CLASSES) for line, names in _class_tests(tree) if names & QUANTIZER_CLASSES]
    assert not branches, f"{path.name} branches on quantizer classes at {branches}: use the grid interface"
    derived = _grid_derivations(tree)
    assert not derived, f"{path.name} derives a grid at {derived}: use Quantizer.grid() / grid_for() / set_range()"


@pytest.mark.parametrize("path", _files(only=PLUGIN_USERS), ids=lambda p: str(p.relative_to(SRC)))
def test_pipeline_cli_api_and_checkpoint_never_test_a_method(path: Path) -> None:
    tree = ast.parse(path.read_text())
    methods = set(method_names())
    compared = [
        (node.lineno, side.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Compare)
        for side in [node.left, *node.comparators]
        if isinstance(side, ast.Constant) and side.value in methods
    ]
    assert not compared, f"{path.name} tests method names at {compared}: give the method a hook instead"
    classes = [(line, names & METHOD_CLASSES) for line, names in _class_tests(tree) if names & METHOD_CLASSES]
    assert not classes, f"{path.name} tests method classes at {classes}"
    imported = [
        node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        and node.module
        and any(node.module.startswith(f"srquant.methods.{m}") for m in ("adabm", "granular_dq", "twodquant", "ptq"))
    ]
    assert not imported, f"{path.name} imports a particular method ({imported}): go through the registry"


@pytest.mark.parametrize("path", sorted((SRC / "models").glob("*.py")), ids=lambda p: p.name)
def test_architectures_never_import_quantization_code(path: Path) -> None:
    tree = ast.parse(path.read_text())
    modules = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in modules if m.startswith(("srquant.quant", "srquant.methods", "srquant.deploy"))]


def test_the_rules_catch_what_they_forbid() -> None:
    """The checks above would fail on code that breaks them (so they are not vacuous)."""
    bad = ast.parse(
        "import torch\n"
        "def f(q, bits):\n"
        "    if isinstance(q, SymmetricQuantizer):\n"
        "        step = (q.upper_bound - q.lower_bound) / (2 ** bits - 1)\n"
        "    return q.step\n"
    )
    assert {names.pop() for _, names in _class_tests(bad)} == {"SymmetricQuantizer"}
    assert {what for _, what in _grid_derivations(bad)} == {"upper_bound", "lower_bound", "2 ** bits", "step"}
    ok = ast.parse("def g(opt):\n    opt.step()\n    return 2 ** 20\n")
    assert not _grid_derivations(ok)
