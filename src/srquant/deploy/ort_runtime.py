"""onnxruntime sessions for exported graphs: a model wrapper for evaluation, and session settings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from srquant.errors import SrquantError

LEVELS = ("basic", "extended", "all")


def ort_session(path: str | Path, threads: int | None = None, level: str = "all"):  # noqa: ANN201 - ort type
    """An onnxruntime CPU session with the given graph-optimisation level ("all" adds NCHWc layouts)."""
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise SrquantError("onnxruntime is not installed: pip install 'srquant[deploy]'") from err
    if level not in LEVELS:
        raise SrquantError(f"unknown optimisation level {level!r}; choose from {', '.join(LEVELS)}")
    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OrtUpscaler(nn.Module):
    """Runs an exported graph on a 1x3xHxW LR tensor in [0, 1]: a model `evaluate` can score like any other."""

    def __init__(self, path: str | Path, scale: int, threads: int | None = None, level: str = "all") -> None:
        super().__init__()
        self.session = ort_session(path, threads, level)
        self.input_name = self.session.get_inputs()[0].name
        self.scale = scale

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(lr.detach().cpu().to(torch.float32).numpy())
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])
