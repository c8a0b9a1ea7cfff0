"""Empirical bias correction: shift each quantized layer's bias by the mean error its output shows.

Quantization errors do not average out to zero per output channel; a super-resolution network passes such a
shift straight into the image, where PSNR counts it on every pixel. After the ranges are calibrated, the layers
are visited in execution order; each one's output is averaged per channel over the calibration crops, with the
layers before it quantized and already corrected, and the difference to the float network's average (taken once,
before any bias moves) is subtracted from its bias. A layer the network calls several times with one set of weights
(CARN-M's shared units) is averaged over all its calls, in both networks; since the layers corrected after its
first call move its later calls, such a network gets three sweeps. A layer without a bias is left alone.
The weights and every grid stay as calibrated, so checkpoints and exports need nothing new.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from tqdm import tqdm

from srquant.methods.training import execution_order, forward_hooks
from srquant.quant.modules import is_quantized
from srquant.quant.quantize import fp_mode

SHARED_SWEEPS = 3  # a shared layer's later calls move when layers after its first call are corrected: sweep again


class _Reached(Exception):
    """Raised by a hook to end a forward pass once the corrected layer has run."""


def _channel_sum(out: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Per-channel sum of a layer output (channels on dim 1 for 4-D maps, last dim otherwise) and the count."""
    flat = out.transpose(0, 1).flatten(1) if out.dim() == 4 else out.reshape(-1, out.shape[-1]).t()
    return flat.sum(dim=1, dtype=torch.float64), flat.shape[1]


@contextmanager
def _channel_means(model: nn.Module, names: Sequence[str], stop_after: int = 0) -> Iterator[dict[str, list]]:
    """Accumulate [sum, count, calls] of each named layer's output per channel: every call of a shared layer
    counts. With `stop_after` > 0 the forward pass ends once the (single) named layer has run that many times."""
    store: dict[str, list] = {}

    def accumulate(key: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            total, count = _channel_sum(out)
            entry = store.setdefault(key, [torch.zeros_like(total), 0, 0])
            entry[0] += total
            entry[1] += count
            entry[2] += 1
            if stop_after and entry[2] % stop_after == 0:
                raise _Reached

        return hook

    with forward_hooks(model, {name: accumulate(name) for name in names}):
        yield store


def _run(model: nn.Module, batches: Sequence[torch.Tensor]) -> None:
    for batch in batches:
        try:
            model(batch)
        except _Reached:
            pass


@torch.no_grad()
def correct_biases(
    model: nn.Module, batches: Sequence[torch.Tensor], progress: bool = False, reference: nn.Module | None = None
) -> list[str]:
    """Correct the bias of every quantized layer that has one, in execution order (in place); returns their names.
    The float averages come from the model's own FP mode, or from `reference` (a `float_teacher` copy) when the
    weights no longer hold their float values (recon)."""
    names = [n for n, m in model.named_modules() if is_quantized(m) and getattr(m, "bias", None) is not None]
    if not names:
        return []
    order = execution_order(model, names, batches[0][:1])
    floating_net = model if reference is None else reference
    with fp_mode(floating_net), _channel_means(floating_net, order) as floating:
        _run(floating_net, batches)
    calls = {name: floating[name][2] // len(batches) for name in order}  # shared layers (CARN-M's units) run often
    sweeps = SHARED_SWEEPS if any(count > 1 for count in calls.values()) else 1
    for sweep in range(sweeps):
        for name in tqdm(order, desc=f"bias correction {sweep + 1}/{sweeps}", disable=not progress, leave=False):
            with _channel_means(model, [name], stop_after=calls[name]) as quantized:
                _run(model, batches)
            (q_sum, count, _), (f_sum, f_count, _) = quantized[name], floating[name]
            bias = model.get_submodule(name).bias
            bias -= (q_sum / count - f_sum / f_count).to(bias.dtype)
    return order
