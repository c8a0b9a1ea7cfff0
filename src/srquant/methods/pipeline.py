"""One call from a float zoo model to a calibrated quantized one: quantize_ -> calibrate (-> DQC).

Methods: `minmax`, `percentile`, `dobi` (PTQ bound calibration) and `2dquant` (DOBI, then DQC); the
dynamic-bit `adabm` and `granular-dq` use their own configs (`code` means `paper` for Granular-DQ). Schedules
come from named presets: `paper` (2DQuant section 4.1), `code` (2DQuant's released config) and `cpu` (the
same algorithm with a schedule that fits a 2-core CPU); every field can be overridden.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from srquant.data.calibration import CropSampler
from srquant.data.io import list_images
from srquant.errors import SrquantError
from srquant.methods.adabm import AdaBMConfig, get_adabm_preset, run_adabm
from srquant.methods.dynamic import dynamic_state, granular_state
from srquant.methods.granular_dq import GranularDQConfig, get_granular_dq_preset, run_granular_dq
from srquant.methods.ptq import calibrate
from srquant.methods.twodquant import DQCConfig, DQCReport, run_dqc
from srquant.models.layout import QuantLayout
from srquant.quant.quantize import QuantReport, quantize_
from srquant.quant.spec import QuantSpec

log = logging.getLogger(__name__)
METHODS = ("minmax", "percentile", "dobi", "2dquant", "adabm", "granular-dq")


@dataclass(frozen=True)
class PTQPreset:
    """Calibration data and DQC schedule for one preset."""

    calib_count: int = 32
    calib_size: int = 64
    calib_batch: int = 8
    dqc_crop: int = 64
    dqc: DQCConfig = field(default_factory=DQCConfig)
    percentile: float = 99.99
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.calib_count, self.calib_size, self.calib_batch, self.dqc_crop) < 1:
            raise SrquantError("preset sizes must be positive")


PRESETS: dict[str, PTQPreset] = {
    # 2DQuant paper, section 4.1: 32 LR crops of 64x64 for DOBI; DQC 3000 iterations, batch 32, Adam 1e-2,
    # betas (0.9, 0.999), cosine annealing; lambda is not given in the paper, the code's 5 is used.
    "paper": PTQPreset(dqc=DQCConfig(iterations=3000, batch_size=32, lr=1e-2, betas=(0.9, 0.999), schedule="cosine")),
    # Released code (options/train/train_2DQuant_x4.yml): 4000 iterations, batch 16, betas (0.9, 0.99),
    # constant learning rate.
    "code": PTQPreset(dqc=DQCConfig(iterations=4000, batch_size=16, lr=1e-2, betas=(0.9, 0.99), schedule="constant")),
    # CPU: the same algorithm and data; fewer and smaller DQC steps (sized in docs/quantization.md).
    "cpu": PTQPreset(
        calib_count=32,
        calib_size=64,
        dqc_crop=40,
        dqc=DQCConfig(iterations=100, batch_size=4, lr=1e-2, betas=(0.9, 0.999), schedule="cosine"),
    ),
}


@dataclass
class QuantizationResult:
    """A quantized model and how it was made (for the checkpoint and for reports)."""

    model: nn.Module
    method: str
    spec: QuantSpec
    preset: str
    report: QuantReport
    calib_seconds: float
    dqc: DQCReport | None = None
    settings: dict[str, object] = field(default_factory=dict)
    dynamic: dict[str, object] | None = None
    rollbacks: list[str] = field(default_factory=list)


def get_preset(name: str, **overrides: object) -> PTQPreset:
    """A named preset with some fields replaced (DQC fields by their DQCConfig names)."""
    if name not in PRESETS:
        raise SrquantError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    preset = PRESETS[name]
    dqc_fields = {f.name for f in dataclasses.fields(DQCConfig)}
    dqc_over = {k: v for k, v in overrides.items() if k in dqc_fields and v is not None}
    own_over = {k: v for k, v in overrides.items() if k not in dqc_fields and v is not None}
    return dataclasses.replace(preset, dqc=dataclasses.replace(preset.dqc, **dqc_over), **own_over)


def quantize_model(
    model: nn.Module,
    layout: QuantLayout,
    method: str,
    spec: QuantSpec,
    calib_folder: str | Path,
    preset: str = "cpu",
    datasets_root: Path | None = None,
    progress: bool = False,
    **overrides: object,
) -> QuantizationResult:
    """Quantize a float model in place by `method`; calibration data are LR crops of `calib_folder`."""
    if method not in METHODS:
        raise SrquantError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if method in ("adabm", "granular-dq") and spec.output_bits is not None:
        raise SrquantError(f"{method} sets per-image activation bits; output quantization is for fixed-bit methods")
    if method == "adabm":
        return _quantize_adabm(model, layout, spec, Path(calib_folder), preset, datasets_root, progress, overrides)
    if method == "granular-dq":
        return _quantize_granular(model, layout, spec, Path(calib_folder), preset, datasets_root, progress, overrides)
    config = get_preset(preset, **overrides)
    scale = int(model.scale)
    multiple = int(getattr(model, "pad_multiple", 1))
    # Crops are rounded up to the size the network pads to anyway (64 for LMLT, 24 for ESWT): no wasted work.
    calib_size = -(-config.calib_size // multiple) * multiple
    dqc_crop = -(-config.dqc_crop // multiple) * multiple
    start = time.perf_counter()
    report = quantize_(model, spec, layout)
    sampler = CropSampler(Path(calib_folder), scale, calib_size, datasets_root)
    crops, _ = sampler.draw(config.calib_count, np.random.default_rng(config.seed))
    batches = list(crops.split(config.calib_batch))
    calibrate(model, batches, "dobi" if method == "2dquant" else method, config.percentile, progress)
    dqc_report = None
    if method == "2dquant" and config.dqc.iterations > 0:
        dqc_sampler = CropSampler(Path(calib_folder), scale, dqc_crop, datasets_root)
        rng = np.random.default_rng(config.seed + 1)
        dqc_report = run_dqc(model, lambda n: dqc_sampler.draw(n, rng)[0], config.dqc, progress)
    seconds = time.perf_counter() - start
    settings: dict[str, object] = {"calib_count": config.calib_count, "calib_size": calib_size}
    if method == "percentile":
        settings["percentile"] = config.percentile
    if method == "2dquant":
        settings.update({"dqc": dataclasses.asdict(config.dqc), "dqc_crop": dqc_crop})
    rollbacks = dqc_report.rollbacks if dqc_report else []
    return QuantizationResult(model, method, spec, preset, report, seconds, dqc_report, settings, None, rollbacks)


def _quantize_adabm(
    model: nn.Module,
    layout: QuantLayout,
    spec: QuantSpec,
    calib_folder: Path,
    preset: str,
    datasets_root: Path | None,
    progress: bool,
    overrides: dict[str, object],
) -> QuantizationResult:
    """AdaBM: per-image, per-layer activation bits around spec.a_bits, symmetric weights at spec.w_bits."""
    fields = {f.name for f in dataclasses.fields(AdaBMConfig)}
    config = get_adabm_preset(preset, **{k: v for k, v in overrides.items() if k in fields})
    multiple = int(getattr(model, "pad_multiple", 1))
    crop = -(-config.crop // multiple) * multiple
    available = _available_crop_size(calib_folder, int(model.scale), crop)
    if available < crop:
        log.warning("AdaBM crops of %d px do not fit the calibration images; using %d px", crop, available)
        crop = max(multiple, available // multiple * multiple)
    sampler = CropSampler(calib_folder, int(model.scale), crop, datasets_root)
    rng = np.random.default_rng(config.seed)
    result = run_adabm(
        model,
        layout,
        spec.w_bits,
        spec.a_bits,
        lambda n: sampler.draw(n, rng)[0],
        config,
        full=spec.full,
        progress=progress,
    )
    used_spec = QuantSpec(spec.w_bits, spec.a_bits, weight_quantizer="symmetric", full=spec.full, matmul=False)
    settings = {"adabm": dataclasses.asdict(config), "crop": crop, "crop_requested": config.crop}
    return QuantizationResult(
        model,
        "adabm",
        used_spec,
        preset,
        result.report,
        result.seconds,
        None,
        settings,
        dynamic_state(result.controller),
        result.rollbacks,
    )


def _available_crop_size(folder: Path, scale: int, wanted: int, share: float = 0.5) -> int:
    """The LR crop size to draw: `wanted` if enough calibration images hold it, else the largest that they do.

    Used for E2B's threshold patches (96 px test patches) and for preset crops too large for small folders
    (AdaBM's 96 px paper crops at x4 on train291).

    The size is `wanted` or the largest multiple of 8 below it that at least `share` of the folder's images hold
    as an LR crop at x`scale` (so the entropy quantiles come from many images, not one); if none does, the largest
    LR side any image has (whole LR images).
    """
    sides = []
    for path in list_images(folder):
        try:
            with Image.open(path) as img:
                width, height = img.size
        except (UnidentifiedImageError, OSError) as err:
            reason = str(err).splitlines()[0] if str(err) else "corrupt file"
            raise SrquantError(f"cannot read image {path}: {reason}") from None
        sides.append(min(width, height) // scale)
    if not sides:
        raise SrquantError(f"calibration folder {folder} has no images")
    for size in [wanted, *range((wanted - 1) // 8 * 8, 0, -8)]:
        if sum(side >= size for side in sides) >= share * len(sides):
            return size
    return max(1, max(sides))


def _quantize_granular(
    model: nn.Module,
    layout: QuantLayout,
    spec: QuantSpec,
    calib_folder: Path,
    preset: str,
    datasets_root: Path | None,
    progress: bool,
    overrides: dict[str, object],
) -> QuantizationResult:
    """Granular-DQ: patch-wise activation bits among act_bits (or one fixed_bits), LSQ weights at spec.w_bits.

    spec.a_bits is not used (the candidate bits come from the config); the body only is quantized. The E2B
    thresholds are calibrated on LR patches of the test patch size (`entropy_patch`, 96) or, when the calibration
    images are too small for it, the largest multiple of 8 that most of them hold (`settings["entropy_patch"]`).
    """
    if spec.full:
        raise SrquantError("Granular-DQ quantizes the body only; --full does not apply")
    fields = {f.name for f in dataclasses.fields(GranularDQConfig)}
    config = get_granular_dq_preset(
        "paper" if preset == "code" else preset,
        w_bits=spec.w_bits,
        **{k: v for k, v in overrides.items() if k in fields and k != "w_bits"},
    )
    multiple = int(getattr(model, "pad_multiple", 1))
    crop = -(-config.patch // multiple) * multiple
    sampler = CropSampler(calib_folder, int(model.scale), crop, datasets_root)
    rng = np.random.default_rng(config.seed)
    if config.loss == "qat":

        def draw(n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
            return sampler.draw(n, rng, with_hr=True)
    else:

        def draw(n: int) -> torch.Tensor:  # type: ignore[misc]
            return sampler.draw(n, rng)[0]

    entropy_patch = _available_crop_size(calib_folder, int(model.scale), config.entropy_patch)
    entropy_sampler = CropSampler(calib_folder, int(model.scale), entropy_patch, datasets_root)
    entropy_rng = np.random.default_rng(config.seed + 1)  # its own stream: the training batches do not change

    def draw_entropy(n: int) -> torch.Tensor:
        return entropy_sampler.draw(n, entropy_rng)[0]

    result = run_granular_dq(model, layout, draw, config, progress=progress, draw_entropy_batch=draw_entropy)
    used_spec = QuantSpec(
        config.w_bits, max(config.candidate_bits), weight_quantizer="lsq", act_quantizer="lsq", matmul=False, full=False
    )
    settings = {
        "granular_dq": dataclasses.asdict(config),
        "crop": crop,
        "entropy_patch": entropy_patch,
        "entropy_count": config.calib_count,
    }
    return QuantizationResult(
        model,
        "granular-dq",
        used_spec,
        preset,
        result.report,
        result.seconds,
        None,
        settings,
        granular_state(model, result),
        result.rollbacks,
    )
