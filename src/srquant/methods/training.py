"""The pieces the methods share: grayscale, augmentation, the execution order of layers, the distillation loss,
frozen weights, and the divergence guard that rolls a run back to its last sound state.

The FP teacher is the same network with quantization switched off (`fp_mode`), in eval mode, so no HR image is
needed and no normalisation statistics move. A method that rewrites the weights (recon writes its learned rounding
into them) distils from a `float_teacher` copy taken before, since `fp_mode` would then run the rewritten weights.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from srquant.quant.quantize import fp_mode, set_mode
from srquant.quant.quantizers import QuantMode

GRAY = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma, as kornia's rgb_to_grayscale


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) luma of an RGB batch in [0, 1] (the channel mean for other channel counts): what AdaBM's image
    complexity and Granular-DQ's patch entropy look at."""
    if x.shape[1] == 3:
        return sum(w * x[:, i : i + 1] for i, w in enumerate(GRAY))  # type: ignore[return-value]
    return x.mean(dim=1, keepdim=True)


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """One of the 8 rotations/flips of a batch (k in 0..7): the papers' rot90/180/270 + flip augmentation."""
    x = torch.rot90(x, k % 4, dims=(-2, -1))
    return x.flip(-1) if k >= 4 else x


def random_dihedral(generator: torch.Generator) -> int:
    """A seeded choice among the 8 dihedral transforms."""
    return int(torch.randint(8, (1,), generator=generator))


def normalised_feature_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared distance between per-sample L2-normalised features (any layout: B x ...)."""
    s = student.flatten(1)
    t = teacher.flatten(1)
    s = s / s.norm(dim=1, keepdim=True).clamp_min(1e-12)
    t = t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return F.mse_loss(s, t)


@contextmanager
def forward_hooks(model: nn.Module, hooks: dict[str, Callable[..., None]], pre: bool = False) -> Iterator[None]:
    """Register a forward hook (`pre`: a forward pre-hook) on each named module for the duration of the block."""
    handles = [
        model.get_submodule(name).register_forward_pre_hook(hook)
        if pre
        else model.get_submodule(name).register_forward_hook(hook)
        for name, hook in hooks.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def capture_stages(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the outputs of the named stage modules during forward passes."""
    store: dict[str, torch.Tensor] = {}

    def keep(key: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _i: tuple, out: torch.Tensor) -> None:
            store[key] = out[0] if isinstance(out, tuple) else out

        return hook

    with forward_hooks(model, {name: keep(name) for name in names}):
        yield store


@contextmanager
def frozen_weights(model: nn.Module, trainable: Iterable[nn.Parameter]) -> Iterator[None]:
    """Only `trainable` parameters require grad inside the block (saves weight-gradient work)."""
    keep = {id(p) for p in trainable}
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(id(p) in keep)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def execution_order(model: nn.Module, names: Sequence[str], sample: torch.Tensor) -> list[str]:
    """The named modules in the order a forward pass first runs them (those it never runs are dropped)."""
    order: list[str] = []

    def first_call(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _args: tuple) -> None:
            if name not in order:
                order.append(name)

        return hook

    with torch.no_grad(), fp_mode(model), forward_hooks(model, {n: first_call(n) for n in names}, pre=True):
        model(sample)
    return order


def float_teacher(model: nn.Module) -> nn.Module:
    """A frozen copy of the network with every quantizer off: the FP teacher of a method that rewrites weights."""
    teacher = copy.deepcopy(model)
    set_mode(teacher, QuantMode.FP)
    return teacher.requires_grad_(False).eval()


def distillation_loss(
    model: nn.Module,
    batch: torch.Tensor,
    stages: Sequence[str],
    feats: dict[str, torch.Tensor],
    feature_weight: float,
    average_stages: bool = False,
    teacher: nn.Module | None = None,
    teacher_feats: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """L1(student, FP teacher) + feature_weight * the normalised feature distance over the stages.

    `feats` is the store of an active `capture_stages(model, stages)`. The teacher is the model's own `fp_mode`,
    or `teacher` (a `float_teacher`) whose stages fill `teacher_feats`. The stage terms are summed (2DQuant's
    L_F) or averaged (`average_stages`: AdaBM's 1/n_blocks).
    """
    with torch.no_grad():
        if teacher is None:
            with fp_mode(model):
                target = model(batch)
            reference = {k: v.detach() for k, v in feats.items()}
        else:
            target = teacher(batch)
            reference = dict(teacher_feats or {})
    loss = F.l1_loss(model(batch), target)
    if stages and feature_weight:
        total = sum(normalised_feature_distance(feats[k], reference[k]) for k in stages)
        loss = loss + feature_weight * (total / len(stages) if average_stages else total)
    return loss


class DivergenceGuard:
    """Rolls training back to the last state that gave a sound loss when the loss turns NaN/inf or blows up.

    A loss counts as blown up when it exceeds `factor` times the median of the recent sound losses (seeded with
    the calibrated model's own losses, so a blow-up in the very first steps is caught too). On a blow-up the
    tracked tensors (parameters, and buffers such as thresholds) are restored, the optimizer's learning rate is
    halved and its state cleared, and a note is kept; after `max_rollbacks` the run stops with the last sound
    state. `final_check` checks the last update, which no loss has judged yet.
    """

    def __init__(
        self,
        tensors: Sequence[torch.Tensor],
        factor: float,
        max_rollbacks: int,
        seed_losses: Iterable[float] = (),
        history: int = 50,
    ) -> None:
        self.tensors = list(tensors)
        self.factor, self.max_rollbacks, self.history = factor, max_rollbacks, history
        self.recent = [v for v in seed_losses if math.isfinite(v)][-history:]
        self.good = self._snapshot()
        self.rollbacks: list[str] = []
        self.stopped = False

    def _snapshot(self) -> list[torch.Tensor]:
        return [t.detach().clone() for t in self.tensors]

    def restore(self) -> None:
        """Put the last sound state back."""
        with torch.no_grad():
            for t, saved in zip(self.tensors, self.good, strict=True):
                t.copy_(saved)

    def median(self) -> float:
        """Median of the recent sound losses (inf before any)."""
        return sorted(self.recent)[len(self.recent) // 2] if self.recent else math.inf

    def is_bad(self, value: float, monitored: float | None = None) -> bool:
        """True for a non-finite loss, or a monitored loss above `factor` times the recent median."""
        watched = value if monitored is None else monitored
        return not math.isfinite(value) or (bool(self.recent) and watched > self.factor * self.median())

    def admit(
        self, value: float, label: str, optimizer: torch.optim.Optimizer | None = None, monitored: float | None = None
    ) -> bool:
        """Judge a loss computed from the current state: True lets the step go on (the state is remembered as
        sound); False means the state was rolled back (and `stopped` says whether to give up)."""
        if self.is_bad(value, monitored):
            median = self.median()
            self.restore()
            if optimizer is not None:
                for group in optimizer.param_groups:
                    group["lr"] *= 0.5
                optimizer.state.clear()
            self.rollbacks.append(
                f"{label}: loss {value:.4g} (median {median:.4g}); last sound state restored, lr halved"
            )
            self.stopped = len(self.rollbacks) >= self.max_rollbacks
            return False
        self.good = self._snapshot()
        return True

    def step(
        self,
        loss: torch.Tensor,
        value: float,
        label: str,
        optimizer: torch.optim.Optimizer,
        monitored: float | None = None,
    ) -> bool:
        """One guarded update: judge `value` (and `monitored`), then backpropagate `loss`, step the optimizer and
        record the judged loss. False: the state was rolled back instead (`stopped` says whether to give up)."""
        if not self.admit(value, label, optimizer, monitored):
            return False
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        self.record(value if monitored is None else monitored)
        return True

    def record(self, value: float) -> None:
        """Add a sound loss to the history."""
        self.recent = (self.recent + [value])[-self.history :]

    def final_check(self, value: float) -> None:
        """Judge the state the last update left (restores the last sound one if it blew up)."""
        if not self.stopped and self.is_bad(value):
            median = self.median()
            self.restore()
            self.rollbacks.append(f"final check: loss {value:.4g} (median {median:.4g}); last sound state restored")
