"""A quantization layout for any network, found by running it once on a small input and recording its graph.

The rules (what srquant's hand-written layouts do for the zoo, applied mechanically):

- every Conv2d and Linear is a candidate; one whose parameters are all frozen (a fixed mean shift) is never
  quantized;
- the conv(s) that read the image (through non-learned ops and frozen layers only) and the conv(s) that produce
  the output pixels (the same, walking back from the output through pixel shuffles, adds, interpolation) stay
  float by default and run at A8 with `--full` (`fixed_8bit`); every other candidate is the body;
- a candidate whose input comes straight out of ReLU, GELU, SiLU or a sigmoid is one-sided (`post_activation`);
- distillation stages are the network's repeated top-level blocks: the largest group of top-level children (or
  members of one top-level ModuleList/Sequential) of the same class that hold candidates;
- attention-matmul hooks (`q_hook` ...) need nothing here: `quantize_` finds them by name.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from srquant.errors import SrquantError
from srquant.models.layout import QuantLayout

ONE_SIDED = {"relu", "gelu", "silu", "sigmoid", "relu6", "hardsigmoid", "softmax"}
CANDIDATES = (nn.Conv2d, nn.Linear)


@dataclass
class Node:
    """How a tensor was made: by a candidate module, an op, or it is the network's input."""

    op: str
    inputs: list[int]
    module: str | None = None


class _Recorder(TorchFunctionMode):
    """Records, for every tensor made during one forward pass, the op (or candidate module) that made it."""

    def __init__(self) -> None:
        super().__init__()
        self.nodes: dict[int, Node] = {}
        self.keep: list[torch.Tensor] = []  # holding every tensor keeps ids unique during the pass

    def remember(self, outputs: Any, node: Node) -> None:
        for tensor in tree_flatten(outputs)[0]:
            if isinstance(tensor, torch.Tensor):
                self.nodes[id(tensor)] = node
                self.keep.append(tensor)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = [id(t) for t in tree_flatten((args, kwargs or {}))[0] if isinstance(t, torch.Tensor)]
        self.remember(out, Node(getattr(func, "__name__", "op").strip("_"), inputs))  # relu_ -> relu, __mul__ -> mul
        return out


@dataclass
class InferredLayout:
    """The layout found for a network, with the reasons behind each group (for printing)."""

    layout: QuantLayout
    body: list[str]
    head: list[str]
    output: list[str]
    never: list[str]
    one_sided: list[str]
    stages: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """A few lines saying which layers are which."""
        return "\n".join(
            [
                f"body ({len(self.body)} layers, at the requested bits): {_short(self.body)}",
                f"reads the image (float; A8 with --full): {_short(self.head)}",
                f"makes the output pixels (float; A8 with --full): {_short(self.output)}",
                f"one-sided inputs (after ReLU/GELU/SiLU/sigmoid): {len(self.one_sided)} layers",
                f"never quantized (frozen): {_short(self.never)}",
                f"distillation stages: {_short(self.stages)}",
            ]
        )


def _short(names: list[str], limit: int = 6) -> str:
    if not names:
        return "-"
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _frozen(module: nn.Module) -> bool:
    params = list(module.parameters(recurse=False))
    return bool(params) and not any(p.requires_grad for p in params)


def _walk_back(start: list[int], nodes: dict[int, Node], passable: set[str], target: int | None) -> Iterator[str]:
    """Candidate modules reached walking back from tensors through non-candidate ops and frozen (`passable`)
    modules; yields "" when `target` (the network input) is reached that way."""
    seen: set[int] = set()
    stack = list(start)
    while stack:
        tid = stack.pop()
        if tid in seen:
            continue
        seen.add(tid)
        if tid == target:
            yield ""
            continue
        node = nodes.get(tid)
        if node is None:
            continue
        if node.module is not None and node.module not in passable:
            yield node.module
            continue
        stack.extend(node.inputs)


def _stages(model: nn.Module, candidates: set[str]) -> list[str]:
    """The largest group of repeated top-level blocks (same class, holding candidates)."""
    groups: dict[tuple[str, type], list[str]] = {}
    for name, child in model.named_children():
        members = list(child.named_children()) if isinstance(child, nn.ModuleList | nn.Sequential) else []
        for sub, module in members:
            groups.setdefault((name, type(module)), []).append(f"{name}.{sub}")
        groups.setdefault(("", type(child)), []).append(name)
    useful = [
        names
        for names in groups.values()
        if len(names) >= 2 and all(any(c.startswith(f"{n}.") for c in candidates) for n in names)
    ]
    return max(useful, key=len) if useful else []


@torch.no_grad()
def infer_layout(model: nn.Module, size: int = 32) -> InferredLayout:
    """Run the network once on a small LR input and derive its layout (see the module docstring)."""
    modules = dict(model.named_modules())
    candidates = {name for name, m in modules.items() if isinstance(m, CANDIDATES)}
    if not candidates:
        raise SrquantError(f"{type(model).__name__} has no Conv2d or Linear layer to quantize")
    never = sorted(name for name in candidates if _frozen(modules[name]))
    multiple = int(getattr(model, "pad_multiple", 1))
    side = -(-size // multiple) * multiple
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0)).to(device)
    recorder = _Recorder()
    inputs: dict[str, int] = {}

    def before(name: str) -> Any:
        def hook(_m: nn.Module, args: tuple) -> None:
            inputs.setdefault(name, id(args[0]))

        return hook

    def after(name: str) -> Any:
        def hook(_m: nn.Module, args: tuple, out: torch.Tensor) -> None:
            recorder.remember(out, Node("module", [id(args[0])], name))

        return hook

    handles = [modules[n].register_forward_pre_hook(before(n)) for n in candidates]
    handles += [modules[n].register_forward_hook(after(n)) for n in candidates]
    was_training = model.training
    try:
        model.eval()
        with recorder:
            recorder.remember(x, Node("input", []))
            output = model(x)
    except Exception as err:  # noqa: BLE001 - any failure of the user's forward is reported in one line
        raise SrquantError(f"{type(model).__name__} failed on a {side}x{side} input while tracing: {err}") from None
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    ran = [n for n in candidates if n in inputs and n not in never]
    passable = set(never)
    head = sorted(n for n in ran if "" in _walk_back([inputs[n]], recorder.nodes, passable, id(x)))
    out_ids = [id(t) for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor)]
    output_layers = sorted({n for n in _walk_back(out_ids, recorder.nodes, passable, None) if n})
    fixed = sorted(set(head) | set(output_layers))
    body = sorted(n for n in ran if n not in fixed)
    one_sided = sorted(n for n in ran if (node := recorder.nodes.get(inputs[n])) is not None and node.op in ONE_SIDED)
    stages = list(getattr(model, "stage_names", ())) or _stages(model, set(body))
    exact = [re.escape(n) for n in body]
    layout = QuantLayout(
        body=tuple(exact),
        post_activation=tuple(re.escape(n) for n in one_sided),
        fixed_8bit=tuple(re.escape(n) for n in fixed),
        never=tuple(re.escape(n) for n in never),
    )
    return InferredLayout(layout, body, head, output_layers, never, one_sided, stages)
