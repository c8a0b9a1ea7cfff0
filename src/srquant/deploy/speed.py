"""Measured speed of integer inference against the fastest FP32 setting of the same runtime (onnxruntime).

FP32 and integer sessions run interleaved, one call each per round, so both see the same machine state; the
median over rounds is reported. Timing and peak memory are measured in fresh processes that import
onnxruntime and numpy only (no srquant, no torch, whose idle thread pool and memory would share the two
cores and the caches with the sessions), which is also how a deployment would load the file.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from srquant.deploy.onnx_export import ExportReport, export_onnx, float_onnx_bytes, rewrite_float_graph
from srquant.deploy.ort_runtime import OrtUpscaler
from srquant.errors import SrquantError
from srquant.outputs import atomic_write_text

FP32_LEVELS = ("extended", "all")  # "all" adds onnxruntime's NCHWc layout transforms; the faster one counts
INT_LEVELS = ("extended", "all")
FP32_LAYOUTS = {"fp32": None, "fp32-layout16": 16, "fp32-layout32": 32}
"""FP32 graphs timed: as exported, and with the integer graph's exact layout rewrites (grouped convs with at
least 16 or 32 outputs per group as one conv per group, channels-last pixel shuffles); the fastest counts."""

_PEAK_SCRIPT = """
import sys
import numpy as np
import onnxruntime as ort
path, height, width, threads, level = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
options = ort.SessionOptions()
options.intra_op_num_threads = threads
options.graph_optimization_level = {"extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
x = np.random.default_rng(0).random((1, 3, height, width), dtype=np.float32)
for _ in range(3):
    session.run(None, {session.get_inputs()[0].name: x})
assert "srquant" not in sys.modules
# VmHWM is this process's own peak; ru_maxrss would carry the parent's peak across exec
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


_TIMING_SCRIPT = """
import json, sys, time
import numpy as np
import onnxruntime as ort
settings = json.loads(sys.argv[1])
height, width, threads, runs = (int(value) for value in sys.argv[2:6])
levels = {"extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
x = np.random.default_rng(0).random((1, 3, height, width), dtype=np.float32)
sessions = {}
for key, (path, level) in settings.items():
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = levels[level]
    options.log_severity_level = 3
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x}
    session.run(None, feed)  # warm-up
    sessions[key] = (session, feed)
times = {key: [] for key in sessions}
for _ in range(runs):  # one call of every setting per round: all see the same machine state
    for key, (session, feed) in sessions.items():
        start = time.perf_counter()
        session.run(None, feed)
        times[key].append((time.perf_counter() - start) * 1000.0)
assert "srquant" not in sys.modules and "torch" not in sys.modules
print(json.dumps({key: float(np.median(values)) for key, values in times.items()}))
"""


def timed_in_fresh_process(
    settings: dict[str, tuple[Path, str]], size: tuple[int, int], threads: int, runs: int
) -> dict[str, float]:
    """Median milliseconds of each (graph, optimisation level) setting, interleaved round by round in a fresh
    process that imports onnxruntime and numpy only."""
    spec = json.dumps({key: [str(path), level] for key, (path, level) in settings.items()})
    argv = [sys.executable, "-c", _TIMING_SCRIPT, spec, str(size[0]), str(size[1]), str(threads), str(runs)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SrquantError(f"onnxruntime could not time the graphs in a fresh process: {done.stderr.strip()[-300:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def parse_size(text: str) -> tuple[int, int]:
    """'256x256' -> (256, 256): an LR height x width."""
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SrquantError(f"size must look like 256x256, got {text!r}") from None
    if min(height, width) < 1:
        raise SrquantError(f"size must be positive, got {text!r}")
    return height, width


def median_latencies(runners: dict[str, Callable[[], object]], runs: int, warmup: int = 1) -> dict[str, float]:
    """Median milliseconds per runner; each round calls every runner once, so settings are measured side by side."""
    for run in runners.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {key: [] for key in runners}
    for _ in range(runs):
        for key, run in runners.items():
            start = time.perf_counter()
            run()
            times[key].append((time.perf_counter() - start) * 1000.0)
    return {key: float(np.median(values)) for key, values in times.items()}


def peak_memory_mb(path: str | Path, size: tuple[int, int], threads: int, level: str) -> float:
    """Peak resident memory (MB, VmHWM) of a fresh Python process that loads the graph and runs it three times."""
    argv = [sys.executable, "-c", _PEAK_SCRIPT, str(path), str(size[0]), str(size[1]), str(threads), level]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SrquantError(f"onnxruntime could not run {path} in a fresh process: {done.stderr.strip()[-300:]}")
    return int(done.stdout.strip().splitlines()[-1]) / 1024.0


class SizedExport(nn.Module):
    """The integer graphs of a network exported per input size (window transformers): one per LR size, cached."""

    def __init__(
        self,
        model: nn.Module,
        workdir: Path,
        calib_inputs: Sequence[torch.Tensor] | None,
        threads: int,
        allow_inexact: bool = False,
    ) -> None:
        super().__init__()
        self.quantized, self.workdir, self.calib_inputs, self.threads = [model], workdir, calib_inputs, threads
        self.allow_inexact = allow_inexact
        self.scale = int(model.scale)
        self.runners: dict[tuple[int, int], OrtUpscaler] = {}

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        size = (int(lr.shape[-2]), int(lr.shape[-1]))
        if size not in self.runners:
            path = self.workdir / f"int_{size[0]}x{size[1]}.onnx"
            export_onnx(self.quantized[0], path, self.calib_inputs, size, allow_inexact=self.allow_inexact)
            self.runners[size] = OrtUpscaler(path, self.scale, self.threads)
        return self.runners[size](lr)


@dataclass
class SpeedReport:
    """One bench-speed measurement; `to_json` gives the documented keys first."""

    backend: str
    size: tuple[int, int]
    threads: int
    runs: int
    fp32_ms: float
    int_ms: float
    speedup: float
    peak_mb: float
    fp32_peak_mb: float
    fp32_setting: str
    int_setting: str
    timings_ms: dict[str, float]
    psnr_fake: float | None = None
    psnr_int: float | None = None
    psnr_delta_db: float | None = None
    export: dict[str, object] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        """The JSON record of `srquant bench-speed --json`."""
        record = asdict(self)
        record["size"] = f"{self.size[0]}x{self.size[1]}"
        return record

    def write(self, path: str | Path) -> None:
        """Write the JSON record atomically (parents created)."""
        atomic_write_text(path, json.dumps(self.to_json(), indent=2) + "\n")


def fp32_graphs(
    model: nn.Module, folder: Path, size: tuple[int, int] | None
) -> dict[str, tuple[Path, tuple[str, ...]]]:
    """The FP32 graphs to time (`FP32_LAYOUTS`), each with its optimisation levels; a rewritten graph is kept
    only if the rewrites changed something that the previous graphs do not already have."""
    plain = float_onnx_bytes(model, size)  # traced once; each rewrite starts from a copy
    graphs: dict[str, tuple[Path, tuple[str, ...]]] = {}
    seen: list[list[str]] = []
    for kind, branch_min in FP32_LAYOUTS.items():
        data, changed = (plain, []) if branch_min is None else rewrite_float_graph(plain, branch_min)
        if changed not in seen:  # the plain graph changes nothing; a rewrite that changes nothing is the same graph
            path = folder / f"{kind}.onnx"
            path.write_bytes(data)
            graphs[kind] = (path, FP32_LEVELS)
            seen.append(changed)
    return graphs


def bench_onnxruntime(
    model: nn.Module,
    size: tuple[int, int],
    threads: int,
    runs: int,
    calib_inputs: Sequence[torch.Tensor] | None,
    psnr: Callable[[nn.Module], float] | None = None,
    workdir: str | Path | None = None,
    allow_inexact: bool = False,
) -> SpeedReport:
    """Export `model` as float and integer graphs, time both on one LR size, and compare Set5 PSNR.

    `psnr(m)` scores a model: the fake-quant one, then the integer graph (as an `OrtUpscaler`).
    """
    with tempfile.TemporaryDirectory(prefix="srquant-speed-") as tmp:
        folder = Path(workdir) if workdir is not None else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        int_path = folder / "int.onnx"
        fixed = int(getattr(model, "pad_multiple", 1)) != 1
        report: ExportReport = export_onnx(
            model, int_path, calib_inputs, size if fixed else None, allow_inexact=allow_inexact
        )
        graphs = {"int": (int_path, INT_LEVELS)} | fp32_graphs(model, folder, size if fixed else None)
        settings = {f"{kind}:{level}": (path, level) for kind, (path, levels) in graphs.items() for level in levels}
        timings = timed_in_fresh_process(settings, size, threads, runs)
        fp32_setting = min((k for k in timings if k.startswith("fp32")), key=timings.__getitem__)
        int_setting = min((k for k in timings if k.startswith("int:")), key=timings.__getitem__)
        fp32_ms, int_ms = timings[fp32_setting], timings[int_setting]
        peak = peak_memory_mb(int_path, size, threads, int_setting.split(":")[1])
        fp32_graph, fp32_level = fp32_setting.split(":")
        fp32_peak = peak_memory_mb(graphs[fp32_graph][0], size, threads, fp32_level)
        result = SpeedReport(
            backend="onnxruntime",
            size=size,
            threads=threads,
            runs=runs,
            fp32_ms=fp32_ms,
            int_ms=int_ms,
            speedup=fp32_ms / int_ms,
            peak_mb=peak,
            fp32_peak_mb=fp32_peak,
            fp32_setting=fp32_setting,
            int_setting=int_setting,
            timings_ms=timings,
            export={
                "quantized_convs": len(report.convs),
                "uint8_ops": report.sunk_dequantize,
                "glue": report.glue,
                "widened_convs": report.widened_convs,
                "branched_convs": report.branched_convs,
                "nhwc_shuffles": report.nhwc_shuffles,
                "uint8_requantize": report.uint8_requantize,
                "uint8_concats": report.uint8_concats,
                "regridded_weights": report.regridded_weights,
                "simulated_outputs": len(report.simulated_outputs),
                "unsimulated_outputs": report.calibrated_outputs + report.image_outputs + report.shared_outputs,
                "dynamic_axes": report.dynamic_axes,
            },
        )
        if psnr is not None:
            scale = int(model.scale)
            integer = (
                SizedExport(model, folder, calib_inputs, threads, allow_inexact)
                if fixed
                else OrtUpscaler(int_path, scale, threads)
            )
            result.psnr_fake = psnr(model)
            result.psnr_int = psnr(integer)
            result.psnr_delta_db = result.psnr_int - result.psnr_fake
        return result
