"""Everything a user can do, one function per task; the CLI parses arguments and calls exactly one of these.

`load_model` (a zoo network), `quantize` (quantize, calibrate and optionally save), `load_quantized`,
`open_model` (a zoo name or a quantized checkpoint), `evaluate` / `evaluate_model` (benchmarks),
`upscale_image` / `upscale_file`, `write_lr_set`, `export_quantized`, `bench_speed`, `list_models`.
Every function that runs a network takes `device` ("auto", "cpu", "cuda", "cuda:N").
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from srquant import report
from srquant.assets import asset_dir
from srquant.data.benchmark import BenchmarkSet
from srquant.data.calibration import CropSampler
from srquant.data.io import image_size, read_image, to_tensor, to_uint8, write_image, write_png_strips
from srquant.deploy.onnx_export import ExportReport, export_onnx
from srquant.deploy.speed import SpeedReport, bench_onnxruntime
from srquant.errors import SrquantError
from srquant.evaluate import DatasetResult, evaluate, image_metrics_of, model_device
from srquant.methods.pipeline import (
    LoadedCheckpoint,
    QuantizationResult,
    check_input_granularity,
    load_checkpoint,
    load_quantized,
    quantize_model,
)
from srquant.methods.registry import get_method, method_names
from srquant.models import user
from srquant.models.infer_layout import InferredLayout, infer_layout
from srquant.models.inference import DEFAULT_OVERLAP, check_tiling, upscale, upscale_strips
from srquant.models.layout import QuantLayout
from srquant.models.registry import (
    REGISTRY,
    architecture_record,
    check_finite,
    checkpoint_path,
    create_model,
    get_entry,
    layout_of,
    layout_to_record,
    load_state_strict,
    read_state_dict,
)
from srquant.models.user import parse_arch
from srquant.outputs import check_output, check_output_folder
from srquant.quant.accounting import Cost, layer_bits, model_cost
from srquant.quant.quantize import GLUE_HOOK_SUFFIX
from srquant.quant.spec import QuantSpec

log = logging.getLogger(__name__)

__all__ = [
    "DatasetResult",
    "ModelEvaluation",
    "OpenedModel",
    "QuantizationResult",
    "bench_speed",
    "evaluate",
    "evaluate_model",
    "export_quantized",
    "list_methods",
    "list_models",
    "load_model",
    "load_quantized",
    "open_model",
    "quantize",
    "random_control",
    "resolve_device",
    "upscale",
    "upscale_file",
    "upscale_image",
    "write_lr_set",
    "write_report",
]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """ "auto" (CUDA when available, else the CPU), "cpu", "cuda" or "cuda:N"; one line for a device not here."""
    if isinstance(device, torch.device):
        return device
    text = (device or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(text)
    except RuntimeError:
        raise SrquantError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise SrquantError(f"device {device!r} asked for, but this machine has no CUDA GPU (use --device cpu)")
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise SrquantError(f"device {device!r} asked for, but only {torch.cuda.device_count()} CUDA GPUs exist")
    elif chosen.type != "cpu":
        raise SrquantError(f"device {device!r} is not supported; use auto, cpu, cuda or cuda:N")
    return chosen


def load_model(
    name: str,
    scale: int,
    assets: str | Path | None = None,
    weights: str | Path | None = None,
    download: bool = False,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """A zoo model with its pretrained (or given) weights, in eval mode, on `device`."""
    model = create_model(name, scale, assets=assets, weights=weights, allow_download=download)
    return model.to(resolve_device(device))


def calibration_folder(calib: str | Path | None, assets: str | Path | None) -> Path:
    """The calibration images: `calib`, else `<assets>/calibration/train291`; one line when it is missing."""
    folder = Path(calib) if calib is not None else asset_dir(assets) / "calibration" / "train291"
    if not folder.is_dir():
        raise SrquantError(
            f"calibration folder {folder} not found; pass --calib DIR (training images, not a benchmark)"
        )
    return folder


def float_network(
    model: str | nn.Module | None,
    scale: int | None,
    assets: str | Path | None = None,
    weights: str | Path | None = None,
    download: bool = False,
    device: str | torch.device = "cpu",
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    input_range: float = 1.0,
) -> nn.Module:
    """A float network to quantize or run: a zoo name, the user's `nn.Module`, or `arch` = `FILE.py:ClassName`
    built with `arch_kwargs`; `weights` are loaded strictly (a `params` / `params_ema` / `state_dict` / `model`
    sub-dict is found by itself). The network is in eval mode on `device`."""
    target = resolve_device(device)
    if arch is None and isinstance(model, str):
        return load_model(model, _required(scale), assets, weights, download, target)
    if arch is not None:
        if model is not None:
            raise SrquantError("give a zoo model (--model NAME) or your own network (--arch FILE.py:Class), not both")
        network = user.network_from_file(arch, _required(scale), arch_kwargs, input_range)
    elif isinstance(model, nn.Module):
        network = model
        if getattr(network, user.ARCH_ATTRIBUTE, None) is None:
            network = user.adopt(network, _required(scale or getattr(network, "scale", None)), arch_kwargs, input_range)
    else:
        raise SrquantError("a network is needed: a zoo name, an nn.Module, or an architecture file")
    if weights is not None:
        load_state_strict(network, read_state_dict(Path(weights)), str(weights))
        check_finite(network, str(weights))
    return network.to(target).eval()


def _required(scale: int | None) -> int:
    if scale is None:
        raise SrquantError("the upscaling factor is needed (--scale S / scale=)")
    return int(scale)


def network_layout(network: nn.Module, layout: QuantLayout | None = None) -> tuple[QuantLayout, InferredLayout | None]:
    """The layout to quantize a network with: the one given, its zoo entry's, or one inferred from its graph. It
    is recorded with the network, so its checkpoint reloads with the same layers and grids even after the zoo
    entry's layout changes."""
    record = architecture_record(network)
    inferred = None
    if layout is None and record.get("kind") == "zoo":
        layout = layout_of(network)
    elif layout is None:
        inferred = infer_layout(network)
        layout = inferred.layout
        if not getattr(network, "stage_names", ()):
            network.stage_names = tuple(inferred.stages)
    record["layout"] = layout_to_record(layout)
    return layout, inferred


def quantize(
    model: str | nn.Module | None,
    scale: int | None,
    method: str,
    w_bits: int,
    a_bits: int,
    calib: str | Path | None = None,
    preset: str = "cpu",
    assets: str | Path | None = None,
    device: str | torch.device = "auto",
    full: bool = False,
    weight_quantizer: str = "asymmetric",
    weight_granularity: str | None = None,
    act_granularity: str = "tensor",
    output_bits: int | None = None,
    glue_bits: int | None = None,
    matmul: bool = True,
    weights: str | Path | None = None,
    output: str | Path | None = None,
    progress: bool = False,
    deploy: str | None = None,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    input_range: float = 1.0,
    layout: QuantLayout | None = None,
    layers: tuple[str, ...] | None = None,
    keep_fp: tuple[str, ...] = (),
    no_adapt: bool = False,
    **overrides: Any,
) -> QuantizationResult:
    """Quantize a network by a registered `method` (minmax, percentile, dobi, 2dquant, adabm, granular-dq, ...)
    with the `preset` schedule; write the checkpoint to `output` when given.

    The network is a zoo name, your own `nn.Module` (RGB in [0, 1] in and out; `input_range=255` for one trained
    on [0, 255]), or `arch="FILE.py:ClassName"` with `arch_kwargs` and `weights`. Without a `layout` srquant infers
    one for a network outside the zoo (`result.inferred`); `layers` (the body) and `keep_fp` override it by
    name patterns. Calibration crops come from `calib` (default: `<assets>/calibration/train291`), never a
    benchmark set. `weight_granularity` None takes the preset's choice (the papers' presets: per tensor;
    srquant's: per channel). `act_granularity="part"` gives each concatenated part of a fusion conv's input (each
    channel, where the layout lists `PER_CHANNEL`) its own grid (fixed-bit methods; not exportable). `overrides`
    replace fields of the method's config (e.g. iterations, batch_size, seed). `no_adapt` turns a dynamic method
    into its fixed-bit twin at `a_bits` (same quantizers, calibration and schedule). `deploy="onnxruntime"` sets
    the recipe whose integer graph computes exactly what the model computes and runs in uint8 between its kernels;
    it needs a8 and a fixed-bit method.
    """
    plugin = get_method(method)
    check_input_granularity(method, act_granularity)
    if act_granularity != "tensor" and deploy is not None:
        raise SrquantError(f"--deploy {deploy} takes one grid per layer input: its kernels have one input scale")
    if no_adapt:
        overrides = {**overrides, **plugin.fixed_twin(a_bits)}
    root = asset_dir(assets)
    folder = calibration_folder(calib, assets)
    if output is not None:
        sources = [weights, parse_arch(arch)[0] if arch else None]
        output = check_output(output, "checkpoint", sources, root)
    plugin.config(preset, overrides)  # a bad preset or override fails before the network is loaded
    network = float_network(model, scale, assets, weights, False, device, arch, arch_kwargs, input_range)
    fields: dict[str, Any] = {
        "full": full,
        "weight_quantizer": weight_quantizer,
        "weight_granularity": weight_granularity or plugin.default_granularity(preset),
        "act_granularity": act_granularity,
        "output_bits": output_bits,
        "glue_bits": glue_bits,
        "matmul": matmul,
        "layers": tuple(layers) if layers else None,
        "keep_fp": tuple(keep_fp),
    }
    if deploy is not None:
        if plugin.dynamic:
            raise SrquantError(f"--deploy needs a fixed-bit method: {method}'s bits change per image or patch")
        w_bits, fields = deploy_recipe(deploy, network, w_bits, a_bits, fields)
    try:
        spec = QuantSpec(w_bits, a_bits, **fields)
    except ValueError as err:
        raise SrquantError(str(err)) from None
    chosen, inferred = network_layout(network, layout)
    result = quantize_model(network, chosen, method, spec, folder, preset, root / "datasets", progress, **overrides)
    result.inferred = inferred
    if output is not None:
        result.save(output)
    return result


DEPLOY_RECIPES = ("onnxruntime",)
DEPLOY_WEIGHT_BITS = 7  # int8 codes within +-63: u8 x s8 kernels without VNNI add pairs in int16 without saturating


def deploy_recipe(
    target: str, network: nn.Module, w_bits: int, a_bits: int, fields: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    """The spec fields of an integer-export recipe: every layer W<=7 (int8 storage) A8 with symmetric per-channel
    weights, simulated outputs, and the tensors between layers quantized where the network marks them."""
    if target not in DEPLOY_RECIPES:
        raise SrquantError(f"unknown deploy target {target!r}; choose from {', '.join(DEPLOY_RECIPES)}")
    if a_bits != 8:
        raise SrquantError(f"--deploy {target} runs uint8 activations: use --abits 8, not {a_bits}")
    bits = min(w_bits, DEPLOY_WEIGHT_BITS)
    has_glue = any(name.endswith(GLUE_HOOK_SUFFIX) for name, _ in network.named_modules())
    recipe = {
        **fields,
        "full": True,
        "full_w_bits": bits,
        "weight_quantizer": "symmetric",
        "output_bits": 8,
        "glue_bits": 8 if has_glue else None,
    }
    return bits, recipe


@dataclass
class OpenedModel:
    """A model to run: a zoo network or a quantized checkpoint, with what to call it and its quantized network."""

    model: nn.Module
    network: nn.Module
    label: str
    checkpoint: LoadedCheckpoint | None = None


def is_checkpoint_reference(reference: str | Path) -> bool:
    """A zoo name wins over a file of the same name unless the path has a directory part or a suffix."""
    text = str(reference)
    if isinstance(reference, Path) or "/" in text or os.sep in text or Path(text).suffix:
        return True
    try:
        get_entry(text)
    except SrquantError:
        return Path(text).is_file()
    return False


def open_model(
    reference: str | Path | None,
    scale: int,
    assets: str | Path | None = None,
    weights: str | Path | None = None,
    download: bool = False,
    device: str | torch.device = "auto",
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    input_range: float = 1.0,
) -> OpenedModel:
    """A zoo model by name, a quantized checkpoint file (it must be a x`scale` model), or your own network
    (`arch` = `FILE.py:ClassName` with `arch_kwargs` and `weights`)."""
    target = resolve_device(device)
    if arch is None and reference is not None and is_checkpoint_reference(reference):
        if weights:
            raise SrquantError("--weights applies to zoo models, not to a quantized checkpoint")
        loaded = load_checkpoint(reference, target)
        if loaded.scale != scale:
            raise SrquantError(f"{reference} is a x{loaded.scale} model, but x{scale} was asked for")
        return OpenedModel(loaded.model, loaded.network, loaded.label(reference), loaded)
    model = float_network(reference, scale, assets, weights, download, target, arch, arch_kwargs, input_range)
    return OpenedModel(model, model, str(reference if reference is not None else arch))


def random_control(
    checkpoint: str | Path, shares: Mapping[int, float], seed: int = 0, device: str | torch.device = "auto"
) -> nn.Module:
    """A dynamic checkpoint's random control: the model loaded afresh, its bits handed out by chance in the
    proportions `shares` (AdaBM: image offsets {-1, 0, 1} -> share, its layer offsets shuffled; Granular-DQ:
    patch bit -> share), deterministic per image or patch content. Compare it at the same FAB."""
    loaded = load_checkpoint(checkpoint, resolve_device(device))
    model = loaded.model
    if not get_method(loaded.method).dynamic or not hasattr(model, "use_controller"):
        raise SrquantError(f"{checkpoint} is a {loaded.method} model: a random control needs dynamic bits")
    model.use_controller(model.controller.randomized(shares, seed))
    return model


@dataclass
class ModelEvaluation:
    """`srquant eval`'s result: what was evaluated, its cost, the scores, and per-image bits of dynamic models."""

    label: str
    description: str
    cost: Cost
    results: list[DatasetResult]
    bits: dict[str, dict[str, Any]] = field(default_factory=dict)


def _describe(opened: OpenedModel) -> tuple[str, dict[str, Any]]:
    """A one-phrase description (bits, method) and the fixed per-result fields (bits, size, BitOPs)."""
    bits = layer_bits(opened.network)
    w_bits = max((w for w, _ in bits.values()), default=32)
    a_bits = max((a for _, a in bits.values()), default=32)
    text = f"W{w_bits}A{a_bits}" if bits else "float"
    if opened.checkpoint is not None and get_method(opened.checkpoint.method).dynamic:
        text = f"{opened.checkpoint.method}, W{w_bits}, activation bits per image or patch (up to A{a_bits})"
    return text, {"wbits": w_bits, "abits": a_bits}


def evaluate_model(
    reference: str | Path,
    scale: int,
    datasets: list[str],
    conventions: list[str] | tuple[str, ...] = ("basicsr",),
    assets: str | Path | None = None,
    tile: int | None = None,
    weights: str | Path | None = None,
    download: bool = False,
    device: str | torch.device = "auto",
    progress: bool = False,
    record_bits: bool = False,
    bitmap_dir: str | Path | None = None,
    overlap: int = DEFAULT_OVERLAP,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    input_range: float = 1.0,
    compare_fp: bool = False,
) -> ModelEvaluation:
    """`srquant eval`: a zoo model or quantized checkpoint on benchmark sets, with its size and BitOPs.

    Dynamic-bit models report each image's FAB and BitOPs (averaged per set); with `record_bits` each image's
    bits are returned; with `bitmap_dir` models that draw bit maps write one PNG per image under
    `bitmap_dir/<dataset>/`. With `compare_fp` a checkpoint of a zoo network is compared with that network's
    published float weights: each result gets `fp_psnr` and `drop_db` (PSNR minus the float PSNR).
    """
    for name in datasets:
        BenchmarkSet.from_assets(name, assets)  # every set is located before the model is loaded
    if bitmap_dir is not None:
        bitmap_dir = check_output_folder(bitmap_dir, [reference, weights], _asset_root(assets))
    opened = open_model(reference, scale, assets, weights, download, device, arch, arch_kwargs, input_range)
    float_model = None
    if compare_fp:  # loaded before any work, so missing float weights fail at once
        source = _float_source(opened, reference)
        float_model = load_model(source, scale, assets, None, download, resolve_device(device))
    model = opened.model
    recorder = getattr(model, "image_record", None)
    painter = getattr(model, "bit_map", None)
    if record_bits and not callable(recorder):
        raise SrquantError("bit records need a dynamic-bit model (quantized with a method whose bits vary per image)")
    if bitmap_dir is not None and not callable(painter):
        raise SrquantError("bit maps need a model whose bits vary per patch (e.g. quantized with granular-dq)")
    measure = image_metrics_of(model)
    bits: dict[str, dict[str, Any]] = {}
    results: list[DatasetResult] = []
    for dataset in datasets:

        def per_image(name: str, lr: torch.Tensor, dataset: str = dataset) -> dict[str, float]:
            if record_bits:
                bits.setdefault(dataset, {})[name] = recorder(lr)  # type: ignore[misc]
            if bitmap_dir is not None:
                write_image(Path(bitmap_dir) / dataset / f"{name}.png", painter(lr))  # type: ignore[misc]
            return measure(name, lr) if measure is not None else {}

        results += evaluate(model, [dataset], scale, conventions, assets, tile, progress, per_image, overlap)
    cost = model_cost(opened.network, scale)
    description, fixed = _describe(opened)
    for result in results:
        # a dynamic model's measured FAB / BitOPs take precedence over the fixed-bit accounting
        result.extras = {**fixed, "size_mb": cost.size_mb, "bitops_g": cost.bitops_g, **result.extras}
    if float_model is not None:
        floats = evaluate(float_model, datasets, scale, conventions, assets, tile, progress, overlap=overlap)
        for result, fp in zip(results, floats, strict=True):
            result.extras.update(fp_psnr=fp.psnr, drop_db=result.psnr - fp.psnr)
    return ModelEvaluation(opened.label, description, cost, results, bits)


def _float_source(opened: OpenedModel, reference: str | Path | None) -> str:
    """The zoo name whose published float weights a checkpoint is compared with (`compare_fp`)."""
    if opened.checkpoint is None:
        raise SrquantError(f"--compare-fp compares a quantized checkpoint with its float network; {reference} is float")
    arch = opened.checkpoint.record["arch"]
    if arch.get("kind") != "zoo" or arch.get("kwargs"):
        raise SrquantError(
            "--compare-fp needs a checkpoint of a zoo network (it uses the published weights); evaluate your own "
            "float network with `srquant eval --arch FILE.py:Class --weights W` for its scores"
        )
    return str(arch["name"])


def image_tensor(image: np.ndarray, value_range: float | None = None) -> torch.Tensor:
    """An HxWx3 array as a 1x3xHxW float tensor in [0, 1]: uint8, or float in [0, 1] with `value_range=1.0`;
    anything else is refused in one line (a float or 16-bit array would otherwise come out black or wrong)."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", type(image).__name__)
        raise SrquantError(f"expected an HxWx3 RGB array, got {shape}")
    if image.dtype == np.uint8:
        if value_range not in (None, 255, 255.0):
            raise SrquantError(f"a uint8 image has values in [0, 255], not [0, {value_range}]")
        return to_tensor(image)
    if np.issubdtype(image.dtype, np.floating) and value_range == 1.0:
        if not np.isfinite(image).all() or image.min() < 0 or image.max() > 1:
            raise SrquantError("a float image with value_range=1.0 must hold finite values in [0, 1]")
        return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1).unsqueeze(0)
    if np.issubdtype(image.dtype, np.floating):
        raise SrquantError(f"a {image.dtype} image needs value_range=1.0 (values in [0, 1]); or pass uint8")
    raise SrquantError(f"expected a uint8 (or float in [0, 1]) image, got {image.dtype}")


def _finite(sr: torch.Tensor, what: str) -> torch.Tensor:
    if not bool(torch.isfinite(sr).all()):
        raise SrquantError(f"the model produced NaN/inf values on {what}")
    return sr


def upscale_image(
    model: nn.Module,
    image: np.ndarray | str | Path,
    tile: int | None = None,
    value_range: float | None = None,
    overlap: int = DEFAULT_OVERLAP,
) -> np.ndarray:
    """Super-resolve an HxWx3 image (uint8, or float in [0, 1] with `value_range=1.0`) or an image file to an
    (sH)x(sW)x3 uint8 image."""
    lr = image_tensor(read_image(image) if isinstance(image, str | Path) else image, value_range)
    what = str(image) if isinstance(image, str | Path) else "the image"
    return to_uint8(_finite(upscale(model, lr.to(model_device(model)), tile, overlap), what))


def _asset_root(assets: str | Path | None) -> Path | None:
    try:
        return asset_dir(assets)
    except SrquantError:
        return None


def upscale_file(
    model: nn.Module | str | Path | None,
    src: str | Path,
    dst: str | Path,
    scale: int | None = None,
    tile: int | None = None,
    assets: str | Path | None = None,
    weights: str | Path | None = None,
    download: bool = False,
    device: str | torch.device = "auto",
    overlap: int = DEFAULT_OVERLAP,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    input_range: float = 1.0,
) -> Path:
    """Read an image file, super-resolve it with a model (or a zoo name / checkpoint / `arch` at `scale`), write it.

    Every input and output is checked before the model is loaded. With `tile`, the output is assembled strip by
    strip, and a PNG is written as the strips come, so memory grows with the tile, not the image.
    """
    references = [str(model)] if isinstance(model, str | Path) and is_checkpoint_reference(model) else []
    references += [parse_arch(arch)[0]] if arch else []
    dst = check_output(dst, "image", [src, weights, *references], _asset_root(assets))
    check_tiling(tile, overlap)
    width, height = image_size(src)
    image = read_image(src)
    if not isinstance(model, nn.Module):
        if scale is None:
            raise SrquantError("upscaling by a model name or checkpoint needs the scale")
        model = open_model(model, scale, assets, weights, download, device, arch, arch_kwargs, input_range).model
    scale = int(model.scale)
    if tile is None or (height <= tile and width <= tile):
        write_image(dst, upscale_image(model, image, tile, overlap=overlap))
        return dst
    lr = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).unsqueeze(0)  # uint8: float per tile
    strips = (to_uint8(_finite(s, str(src)), in_place=True) for _, s in upscale_strips(model, lr, tile, overlap))
    if dst.suffix.lower() == ".png":
        write_png_strips(dst, height * scale, width * scale, strips)
    else:
        write_image(dst, np.concatenate(list(strips), axis=0))
    return dst


def write_lr_set(dataset: str, scale: int, out: str | Path, assets: str | Path | None = None) -> list[Path]:
    """Write the bicubic LR images of a benchmark as `<name>x<s>.png` (the benchmarks' own file names) into a
    folder outside the asset folder (checked before anything is written)."""
    bench = BenchmarkSet.from_assets(dataset, assets)
    folder = check_output_folder(out, [bench.hr_dir], _asset_root(assets))
    written = []
    for pair in bench.iter_pairs(scale):
        path = folder / f"{pair.name}x{scale}.png"
        write_image(path, pair.lr)
        written.append(path)
    return written


def _fixed_bit_model(path: str | Path) -> nn.Module:
    """A quantized checkpoint that has one static integer graph, on the CPU; dynamic-bit models are refused."""
    loaded = load_checkpoint(path, "cpu")
    if get_method(loaded.method).dynamic:
        raise SrquantError(
            f"{path} is a dynamic-bit model ({loaded.method}): its bits change per image or patch, and onnxruntime "
            "has no per-sample bit switching; export a fixed-bit model (docs/deploy.md)"
        )
    return loaded.model


def calibration_inputs(
    scale: int, calib: str | Path | None = None, assets: str | Path | None = None, count: int = 16, size: int = 64
) -> list[torch.Tensor] | None:
    """LR crops from the calibration folder (default `<assets>/calibration/train291`), or None if absent."""
    try:
        root: Path | None = asset_dir(assets)
    except SrquantError:
        if calib is None:
            return None
        root = None
    folder = Path(calib) if calib is not None else root / "calibration" / "train291"  # type: ignore[operator]
    if not folder.is_dir():
        return None
    datasets = root / "datasets" if root is not None else None
    crops, _ = CropSampler(folder, scale, size, datasets).draw(count, np.random.default_rng(0))
    return list(crops.split(4))


def export_quantized(
    path: str | Path,
    out: str | Path,
    size: tuple[int, int] | None = None,
    calib: str | Path | None = None,
    assets: str | Path | None = None,
    allow_inexact: bool = False,
) -> ExportReport:
    """`srquant export`: a fixed-bit A8 checkpoint as an integer QDQ ONNX graph for onnxruntime (CPU)."""
    out = check_output(out, "onnx", [path], _asset_root(assets))
    model = _fixed_bit_model(path)
    return export_onnx(
        model, out, calibration_inputs(int(model.scale), calib, assets), size, allow_inexact=allow_inexact
    )


def bench_speed(
    path: str | Path,
    size: tuple[int, int] = (256, 256),
    threads: int | None = None,
    runs: int = 10,
    assets: str | Path | None = None,
    calib: str | Path | None = None,
    psnr_dataset: str | None = "Set5",
    allow_inexact: bool = False,
) -> SpeedReport:
    """`srquant bench-speed`: integer vs fastest FP32 onnxruntime latency, peak memory, and the PSNR change."""
    model = _fixed_bit_model(path)
    scale = int(model.scale)

    def psnr(candidate: nn.Module) -> float:
        return evaluate(candidate, [psnr_dataset], scale, ["basicsr"], assets, progress=False)[0].psnr  # type: ignore[list-item]

    score: Callable[[nn.Module], float] | None = psnr if psnr_dataset else None
    return bench_onnxruntime(
        model,
        size,
        threads or os.cpu_count() or 1,
        runs,
        calibration_inputs(scale, calib, assets),
        score,
        allow_inexact=allow_inexact,
    )


@dataclass(frozen=True)
class ZooRow:
    """One zoo entry as `srquant models` lists it."""

    name: str
    kind: str
    scales: tuple[int, ...]
    local: tuple[int, ...]
    note: str


def list_models(assets: str | Path | None = None) -> tuple[Path, list[ZooRow]]:
    """The asset directory and every zoo entry with the scales whose weights are available locally."""
    root = asset_dir(assets)
    rows = []
    for entry in REGISTRY.values():
        local = []
        for scale in entry.scales:
            try:
                checkpoint_path(entry, scale, assets, allow_download=False)
                local.append(scale)
            except SrquantError:
                pass
        rows.append(ZooRow(entry.name, entry.kind, entry.scales, tuple(local), entry.note))
    return root, rows


@dataclass(frozen=True)
class MethodRow:
    """One registered method as `srquant methods` lists it."""

    name: str
    dynamic: bool
    presets: tuple[str, ...]
    summary: str


def list_methods() -> list[MethodRow]:
    """Every registered quantization method with its presets."""
    return [MethodRow(m.name, m.dynamic, tuple(m.presets), m.summary) for m in (get_method(n) for n in method_names())]


def write_report(
    models: Sequence[str | Path | nn.Module],
    scale: int,
    datasets: Sequence[str],
    out: str | Path,
    assets: str | Path | None = None,
    images: Sequence[str] | None = None,
    per_dataset: int = 2,
    error_maps: bool = False,
    device: str | torch.device = "auto",
    progress: bool = False,
) -> Path:
    """`srquant report`: an HTML page of scores, crops, bit maps and plots for zoo names, quantized checkpoints and
    float modules; the float network of the first quantized zoo checkpoint is added when none is named."""
    sets = [BenchmarkSet.from_assets(name, assets) for name in datasets]
    inputs = [m for m in models if isinstance(m, str | Path) and is_checkpoint_reference(m)]
    folder = check_output_folder(out, inputs, _asset_root(assets))
    target = resolve_device(device)
    entries: list[report.Entry] = []
    for reference in models:
        if isinstance(reference, nn.Module):
            cost = model_cost(reference, scale)
            entries.append(report.Entry(type(reference).__name__, reference, reference, cost.size_mb, cost.bitops_g))
            entries[-1].is_float = True
            continue
        opened = open_model(reference, scale, assets, device=target)
        cost = model_cost(opened.network, scale)
        meta = opened.checkpoint.record.get("meta", {}) if opened.checkpoint else {}
        label = Path(str(reference)).stem if opened.checkpoint else str(reference)
        entry = report.Entry(
            label, opened.model, opened.network, cost.size_mb, cost.bitops_g, meta.get("calib_seconds")
        )
        entry.is_float = opened.checkpoint is None
        entries.append(entry)
    zoo = [e.network.srquant_arch for e in entries if getattr(e.network, "srquant_arch", {}).get("kind") == "zoo"]
    if zoo and not any(e.is_float for e in entries):
        name = str(zoo[0]["name"])
        if dict(zoo[0].get("kwargs", {})) == dict(get_entry(name).kwargs):  # the zoo's own network: its weights
            try:
                model = load_model(name, scale, assets, device=target)
            except SrquantError as err:
                log.warning("no float %s to compare with (%s): the drop column stays empty", name, err)
            else:
                cost = model_cost(model, scale)
                entries.insert(0, report.Entry(f"{name} (FP)", model, model, cost.size_mb, cost.bitops_g, None, True))
    return report.build_report(entries, sets, scale, folder, list(images or []), per_dataset, error_maps, progress)
