"""AdaBM (Hong & Lee, CVPR 2024): image- and layer-adaptive activation bits, fitted in seconds from LR crops.

Every adaptive layer k quantizes its input, for image x, at
    a_k(x) = base + b_img(x) + b_layer(k),   b_img, b_layer in {-1, 0, +1},
with the hard value used forward and a tanh surrogate backward (`soft - soft.detach() + hard.detach()`).

1. `quantize_` with a symmetric weight quantizer; the adaptive layers are the layout's body (with `full`,
   head/upsampler/tail run at a fixed, non-adaptive W8A8).
2. Weight bounds: a 50-point MSE search over u = max|W| * (1 - 0.01 i). Deliberate fix: the released code
   starts from max(W), which under-covers weights whose largest magnitude is negative.
3. Calibration (quantization off, eval mode): activation bounds = min/max with EMA 0.9 over the batches;
   Image2Bit thresholds = 10th/90th percentiles of the image complexity per batch, EMA 0.9;
   Layer2Bit sensitivity = mean over batches of the per-sample std of the layer input, bottom 30% -> -1,
   top 30% -> +1.
4. Bit-aware clipping (BaC), once: a 100-point grid (l, u) * (1 - 0.01 i) at each layer's bit base + b_layer,
   MSE, blended 50/50 with the current bounds. Run on the first fine-tuning batch, as the original does.
5. Fine-tuning by distillation from the same network in `fp_mode` (no HR images): phases cycle weight bounds ->
   activation bounds -> bit measures, one Adam per group, learning rates x0.9 (StepLR, step 1) at every
   phase change. Loss = L1 + w_feat * mean over stages of the normalised feature distance
   (+ w_bit * max(avg_bit - base, 0) in the bit phases).

Departures from the released code: max|W| (above); the model stays in eval mode throughout (the original's
train-mode calibration would move BatchNorm statistics); a divergence guard rolls back every trainable method
parameter (the original can collapse to about 6 dB when the weight bounds blow up); no test-set model selection.
The weight grid has 2^(b-1)-1 steps per side with zero exact (15 levels at 4 bits); the original rounds
(w+u)/2u * (2^b-1), 16 levels without zero. Evaluation is whole-image with one image bit per image; the
original's body-only protocol scores 96x96 LR patches with a bit per patch.

Ablation switches (`AdaBMConfig.image2bit`, `layer2bit`, `bit_aware_clipping`): with `image2bit=False` b_img is 0
for every image and the thresholds are neither calibrated nor trained; with `layer2bit=False` b_layer is 0 and the
layer measures are neither calibrated nor trained (the sensitivities are still recorded). With both off the
method is fixed-bit at the base with the same quantizer, calibration, BaC and weight/activation fine-tuning: the
bit phases keep their place in the schedule (same batches drawn, same learning-rate decay) but take no step. The
switches are part of the controller's state, so a reloaded checkpoint gives the same bits.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle
from tqdm import tqdm

from srquant.errors import SrquantError
from srquant.methods.twodquant import capture_stages, dihedral, frozen_weights, normalised_feature_distance
from srquant.models.layout import QuantLayout
from srquant.quant.accounting import layer_bits
from srquant.quant.modules import is_quantized
from srquant.quant.quantize import QuantReport, fp_mode, mode_scope, quantize_, quantizers, set_mode
from srquant.quant.quantizers import AsymmetricQuantizer, QuantMode, SymmetricQuantizer, straight_through
from srquant.quant.spec import QuantSpec, matches

PHASES = ("weight", "activation", "bit")
log = logging.getLogger(__name__)
GRAY = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma, as kornia's rgb_to_grayscale


@dataclass(frozen=True)
class AdaBMConfig:
    """AdaBM schedule and hyper-parameters; `ADABM_PRESETS` holds the paper's run.sh and a CPU-sized one."""

    epochs: int = 10
    iterations: int = 50
    batch_size: int = 2
    crop: int = 96  # LR crop size the caller's draw_batch should produce (informational for run_adabm)
    calib_count: int = 100
    calib_batch: int = 16
    feature_weight: float = 10.0
    bit_weight: float = 50.0
    lr_w: float = 0.01
    lr_a: float = 0.01
    lr_measure_img: float = 0.1
    lr_measure_layer: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    lr_gamma: float = 0.9
    ema_beta: float = 0.9
    img_percentile: float = 10.0
    layer_percentile: float = 30.0
    weight_candidates: int = 50
    bac_candidates: int = 100
    bac_blend: float = 0.5
    bit_aware_clipping: bool = True
    image2bit: bool = True  # ablation: False fixes b_img = 0 (thresholds not calibrated, not trained)
    layer2bit: bool = True  # ablation: False fixes b_layer = 0 (layer measures not calibrated, not trained)
    augment: bool = True
    seed: int = 0
    blowup_factor: float = 4.0
    max_rollbacks: int = 5
    guard_seed_batches: int = 8

    def __post_init__(self) -> None:
        for name in ("bit_aware_clipping", "image2bit", "layer2bit", "augment"):
            if not isinstance(getattr(self, name), bool):
                raise SrquantError(f"AdaBM {name} must be True or False, got {getattr(self, name)!r}")
        if min(self.epochs, self.iterations) < 0:
            raise SrquantError("AdaBM needs epochs >= 0 and iterations >= 0")
        if min(self.batch_size, self.crop, self.calib_count, self.calib_batch) < 1:
            raise SrquantError("AdaBM batch sizes, crop and calibration count must be positive")
        for name in ("lr_w", "lr_a", "lr_measure_img", "lr_measure_layer"):
            if not getattr(self, name) > 0:
                raise SrquantError(f"AdaBM {name} must be positive, got {getattr(self, name)}")
        if self.feature_weight < 0 or self.bit_weight < 0:
            raise SrquantError("AdaBM loss weights must be non-negative")
        if not 0 < self.lr_gamma <= 1 or not 0 <= self.ema_beta < 1 or not 0 <= self.bac_blend <= 1:
            raise SrquantError("AdaBM needs lr_gamma in (0, 1], ema_beta in [0, 1) and bac_blend in [0, 1]")
        if not 0 < self.img_percentile < 50 or not 0 < self.layer_percentile < 50:
            raise SrquantError("AdaBM percentiles must be in (0, 50)")
        if min(self.weight_candidates, self.bac_candidates, self.max_rollbacks) < 1:
            raise SrquantError("AdaBM candidate counts and max_rollbacks must be >= 1")
        if not self.blowup_factor > 1:
            raise SrquantError(f"AdaBM blowup_factor must exceed 1, got {self.blowup_factor}")


ADABM_PRESETS: dict[str, AdaBMConfig] = {
    # AdaBM src/run.sh: 10 epochs x 50 iterations (100 images / batch 2), 96x96 LR crops (patch 384 at x4),
    # 100 calibration images in batches of 16, w_skt 10, w_bitloss 50.
    "paper": AdaBMConfig(),
    # The same algorithm sized for a 2-core CPU (IMDN x4 well under 5 minutes).
    # 64 calibration crops in 4 batches, so the thresholds' EMA sees several batches as in the original.
    "cpu": AdaBMConfig(epochs=6, iterations=10, batch_size=2, crop=40, calib_count=64, calib_batch=16),
}
ADABM_PRESETS["code"] = ADABM_PRESETS["paper"]  # the paper's tables were not found: run.sh is both


def get_adabm_preset(name: str, **overrides: object) -> AdaBMConfig:
    """A named preset with some fields replaced (None values are ignored)."""
    if name not in ADABM_PRESETS:
        raise SrquantError(f"unknown AdaBM preset {name!r}; choose from {', '.join(ADABM_PRESETS)}")
    return dataclasses.replace(ADABM_PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})


def image_complexity(x: torch.Tensor) -> torch.Tensor:
    """Image2Bit's complexity per sample: 1000 * mean |first-order gradient| of the grayscale image in [0, 1].

    Operator (kornia.spatial_gradient's default, re-written here): grayscale = 0.299 R + 0.587 G + 0.114 B,
    replicate padding by 1, normalised Sobel kernels [[-1,0,1],[-2,0,2],[-1,0,1]] / 8 and its transpose; the
    mean of |gx| and |gy| over both directions and all pixels.
    """
    if x.shape[1] == 3:
        gray = sum(w * x[:, i : i + 1] for i, w in enumerate(GRAY))
    else:
        gray = x.mean(dim=1, keepdim=True)
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=x.dtype, device=x.device) / 8
    kernels = torch.stack([kx, kx.t()]).unsqueeze(1)  # (2, 1, 3, 3)
    grad = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), kernels)
    return 1000.0 * grad.abs().flatten(1).mean(dim=1)


class BitController(nn.Module):
    """AdaBM's learnable bit state: Image2Bit thresholds (measure_l, measure_u) and Layer2Bit measures.

    It belongs to the method, not to the architecture: `attach_controller` hooks it onto a model so every
    forward sets each adaptive layer's per-sample `bits_override`. Its state_dict holds the thresholds, the
    measures, the calibrated sensitivities and (extra state) the layer names, base bits and ablation switches:
    `image2bit=False` makes b_img 0, `layer2bit=False` makes b_layer 0.
    """

    def __init__(
        self, layer_names: Sequence[str], base_bits: int, image2bit: bool = True, layer2bit: bool = True
    ) -> None:
        super().__init__()
        self.layer_names = tuple(layer_names)
        self.base_bits = int(base_bits)
        self.image2bit = bool(image2bit)
        self.layer2bit = bool(layer2bit)
        self.measure_l = nn.Parameter(torch.tensor(0.0))
        self.measure_u = nn.Parameter(torch.tensor(1.0))
        self.measure_layer = nn.Parameter(torch.zeros(len(self.layer_names)))
        self.register_buffer("sensitivity", torch.zeros(len(self.layer_names)))
        self.last_bits: torch.Tensor | None = None

    def get_extra_state(self) -> dict[str, object]:
        """Layer names, base bits and switches travel with the state: a reload gives the same bits or fails."""
        return {
            "layer_names": list(self.layer_names),
            "base_bits": self.base_bits,
            "image2bit": self.image2bit,
            "layer2bit": self.layer2bit,
        }

    def set_extra_state(self, state: dict[str, object]) -> None:
        """Refuse a state saved for other layers or another base bit-width; take its switches (absent = on)."""
        names, base = tuple(state["layer_names"]), int(state["base_bits"])  # type: ignore[arg-type,call-overload]
        if names != self.layer_names or base != self.base_bits:
            raise SrquantError("AdaBM bit state was saved for other layers or another base bit-width")
        self.image2bit = bool(state.get("image2bit", True))  # states written before the switches had both on
        self.layer2bit = bool(state.get("layer2bit", True))

    def trainable(self) -> list[nn.Parameter]:
        """The bit parameters that can change the bits: thresholds with Image2Bit on, measures with Layer2Bit on."""
        params = [self.measure_l, self.measure_u] if self.image2bit else []
        return params + [self.measure_layer] if self.layer2bit else params

    def image_bits(self, x: torch.Tensor) -> torch.Tensor:
        """b_img per sample in {-1, 0, +1}; surrogate tanh((c - (u+l)/2) * 2 / (u-l)) backward (0 when off)."""
        if not self.image2bit:
            return x.new_zeros(x.shape[0])
        c = image_complexity(x)
        lower, upper = self.measure_l, self.measure_u
        hard = (c > upper).float() - (c < lower).float()
        soft = torch.tanh((c - (upper + lower) / 2) * 2 / (upper - lower).abs().clamp_min(1e-6))
        return straight_through(soft, hard)

    def layer_bits(self) -> torch.Tensor:
        """b_layer per adaptive layer: round(clamp(m, -1, 1)) forward, tanh(m) backward (0 when off)."""
        m = self.measure_layer
        if not self.layer2bit:
            return m.detach().new_zeros(m.shape)
        return straight_through(torch.tanh(m), torch.round(m.clamp(-1.0, 1.0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Activation bits (B, n_layers) for a batch: base + b_img + b_layer."""
        return self.base_bits + self.image_bits(x)[:, None] + self.layer_bits()[None, :]


def _adaptive_quantizers(model: nn.Module, controller: BitController) -> list[AsymmetricQuantizer]:
    return [model.get_submodule(name).input_quantizer for name in controller.layer_names]  # type: ignore[misc]


def attach_controller(model: nn.Module, controller: BitController) -> RemovableHandle:
    """Make every model forward set the adaptive layers' per-sample bits from its LR input."""
    targets = _adaptive_quantizers(model, controller)

    def hook(_module: nn.Module, args: tuple) -> None:
        bits = controller(args[0])
        controller.last_bits = bits
        for k, quantizer in enumerate(targets):
            quantizer.bits_override = bits[:, k].view(-1, 1, 1, 1)

    return model.register_forward_pre_hook(hook)


def detach_controller(model: nn.Module, controller: BitController, handle: RemovableHandle) -> None:
    """Remove the hook and return the adaptive layers to their fixed base bits."""
    handle.remove()
    for quantizer in _adaptive_quantizers(model, controller):
        quantizer.bits_override = None


@dataclass
class BitReport:
    """Bits used for a batch: per adaptive layer one bit per sample, and FAB (mean activation bit)."""

    per_layer: dict[str, list[int]]
    per_image_fab: list[float]
    fab: float


@torch.no_grad()
def bit_report(controller: BitController, x: torch.Tensor) -> BitReport:
    """The per-layer bits and FAB (mean over adaptive layers, then over images) for a batch or one image."""
    if x.dim() == 3:
        x = x.unsqueeze(0)
    bits = controller(x).round().to(torch.int64)  # (B, n): exact integers already
    per_layer = {name: bits[:, k].tolist() for k, name in enumerate(controller.layer_names)}
    per_image = bits.double().mean(dim=1)
    return BitReport(per_layer, per_image.tolist(), float(per_image.mean()))


def accounting_bits(model: nn.Module, controller: BitController, image: torch.Tensor) -> dict[str, tuple[int, int]]:
    """`layer -> (w_bits, a_bits)` for `accounting.bitops` with the adaptive layers at this image's real bits."""
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.shape[0] != 1:
        raise SrquantError("accounting_bits takes one image: BitOPs differ per image")
    bits = layer_bits(model)
    for name, per_sample in bit_report(controller, image).per_layer.items():
        if name in bits:
            bits[name] = (bits[name][0], per_sample[0])
    return bits


class _EMACalibrator:
    """min/max with EMA across batches; optionally the mean per-sample std (Layer2Bit sensitivity)."""

    def __init__(self, name: str, beta: float) -> None:
        self.name = name
        self.beta = beta
        self.lo: float | None = None
        self.hi = 0.0
        self.std_sum = 0.0
        self.batches = 0

    def collect(self, x: torch.Tensor) -> None:
        x = x.float()
        if not torch.isfinite(x).all():
            raise SrquantError(f"non-finite values (NaN/inf) reached quantizer {self.name} during calibration")
        lo, hi = float(x.min()), float(x.max())
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo = self.beta * self.lo + (1 - self.beta) * lo
            self.hi = self.beta * self.hi + (1 - self.beta) * hi
        self.std_sum += float(x.flatten(1).std(dim=1).mean()) if x.dim() > 1 and x[0].numel() > 1 else 0.0
        self.batches += 1


@torch.no_grad()
def init_weight_bound(quantizer: SymmetricQuantizer, weight: torch.Tensor, candidates: int = 50) -> float:
    """Set u to the MSE-best of u = max|W| * (1 - 0.01 i), i < candidates (the original uses max(W))."""
    w = weight.detach().float().flatten()
    top = float(w.abs().max().clamp_min(1e-8))
    half = 2 ** (quantizer.bits - 1) - 1
    best_u, best_err = top, math.inf
    for i in range(candidates):
        u = top * (1 - 0.01 * i)
        step = u / half
        err = float(((w.clamp(-u, u) / step).round() * step - w).pow(2).sum())
        if err < best_err:
            best_u, best_err = u, err
    quantizer.set_bounds(-best_u, best_u)
    return best_u


@torch.no_grad()
def calibrate_adabm(
    model: nn.Module, controller: BitController, batches: Sequence[torch.Tensor], config: AdaBMConfig
) -> None:
    """Weight bounds by MSE search; activation bounds, Image2Bit thresholds and Layer2Bit measures by EMA stats."""
    named = [(n, m) for n, m in model.named_modules() if is_quantized(m)]
    for _, module in named:
        if isinstance(module.weight_quantizer, SymmetricQuantizer):
            init_weight_bound(module.weight_quantizer, module.weight, config.weight_candidates)  # type: ignore[arg-type]
    cals = {name: _EMACalibrator(name, config.ema_beta) for name, _ in named}
    for name, module in named:
        module.input_quantizer.calibrator = cals[name]
    model.eval()
    low_q, high_q = config.img_percentile / 100, 1 - config.img_percentile / 100
    lower = upper = None
    try:
        with mode_scope(model, QuantMode.CALIBRATE):
            for batch in batches:
                model(batch)
                if not controller.image2bit:
                    continue
                c = image_complexity(batch)
                lo, hi = float(torch.quantile(c, low_q)), float(torch.quantile(c, high_q))
                if lower is None or upper is None:
                    lower, upper = lo, hi
                else:
                    lower = config.ema_beta * lower + (1 - config.ema_beta) * lo
                    upper = config.ema_beta * upper + (1 - config.ema_beta) * hi
    finally:
        for _, module in named:
            module.input_quantizer.calibrator = None
    unused = [name for name, _ in named if cals[name].lo is None]
    if any(name in unused for name in controller.layer_names):
        raise SrquantError(f"adaptive layer {next(n for n in controller.layer_names if n in unused)} saw no data")
    for name, module in named:
        if name not in unused:
            module.input_quantizer.set_bounds(cals[name].lo, cals[name].hi)  # type: ignore[operator]
    if controller.image2bit:
        assert lower is not None and upper is not None
        controller.measure_l.fill_(lower)
        controller.measure_u.fill_(max(upper, lower + 1e-3))
    sens = torch.tensor([cals[n].std_sum / cals[n].batches for n in controller.layer_names])
    controller.sensitivity.copy_(sens)
    if controller.layer2bit:
        q = config.layer_percentile / 100
        low, high = torch.quantile(sens, q), torch.quantile(sens, 1 - q)
        controller.measure_layer.copy_((sens > high).float() - (sens < low).float())
    set_mode(model, QuantMode.QUANT)
    for name, module in named:
        if name in unused:  # never reached (an upsampler of another scale): left in floating point
            module.input_quantizer.mode = module.weight_quantizer.mode = QuantMode.FP
    if unused:
        log.info("%d quantized layers saw no calibration data and stay FP (first: %s)", len(unused), unused[0])


def _grid_errors(x: torch.Tensor, lo: float, hi: float, bits: int, candidates: int) -> torch.Tensor:
    """Squared error of asymmetric b-bit quantization with bounds (lo, hi) * (1 - 0.01 i), i < candidates."""
    values = x.detach().float().flatten()
    scales = 1 - 0.01 * torch.arange(candidates, dtype=torch.float32)
    chunk = max(1, (1 << 24) // max(values.numel(), 1))  # about 16M elements per vectorised chunk
    errors = []
    for part in scales.split(chunk):
        lower, upper = (lo * part)[:, None], (hi * part)[:, None]
        step = (upper - lower).clamp_min(1e-12) / (2**bits - 1)
        q = torch.round((torch.minimum(torch.maximum(values, lower), upper) - lower) / step) * step + lower
        errors.append((q - values).pow(2).sum(dim=1))
    return torch.cat(errors)


@torch.no_grad()
def bit_aware_clipping(model: nn.Module, controller: BitController, batch: torch.Tensor, config: AdaBMConfig) -> None:
    """BaC: per adaptive layer, grid (l, u) * (1 - 0.01 i) at bit base + b_layer, MSE; blend with current bounds.

    Runs inside one quantized forward pass, each layer just before it quantizes, so later layers see inputs
    already produced with the clipped bounds of earlier ones (as the original's first-step BaC does).
    """
    layer_bits_hard = (controller.base_bits + controller.layer_bits()).round().to(torch.int64).tolist()
    handles = []
    for quantizer, bits in zip(_adaptive_quantizers(model, controller), layer_bits_hard, strict=True):

        def hook(q: nn.Module, args: tuple, bits: int = bits) -> None:
            lo, hi = float(q.lower_bound), float(q.upper_bound)
            shrink = 1 - 0.01 * int(_grid_errors(args[0], lo, hi, bits, config.bac_candidates).argmin())
            beta = config.bac_blend
            q.set_bounds(beta * lo + (1 - beta) * lo * shrink, beta * hi + (1 - beta) * hi * shrink)

        handles.append(quantizer.register_forward_pre_hook(hook))
    try:
        model(batch)
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class AdaBMResult:
    """A model quantized and fitted by AdaBM, its bit controller and what happened."""

    controller: BitController
    handle: RemovableHandle
    report: QuantReport
    adaptive_layers: tuple[str, ...]
    config: AdaBMConfig
    losses: list[float] = field(default_factory=list)
    phases: list[str] = field(default_factory=list)
    rollbacks: list[str] = field(default_factory=list)
    stopped_early: bool = False
    calib_seconds: float = 0.0
    seconds: float = 0.0


def _method_parameters(model: nn.Module, controller: BitController) -> dict[str, list[nn.Parameter]]:
    """Trainable parameters per phase: weight bounds, activation bounds, the switched-on bit thresholds/measures."""
    weights, acts = [], []
    for name, q in quantizers(model):
        (weights if name.endswith("weight_quantizer") else acts).extend(q.parameters(recurse=False))
    return {"weight": weights, "activation": acts, "bit": controller.trainable()}


def _distill_loss(
    model: nn.Module, batch: torch.Tensor, stages: tuple[str, ...], feats: dict[str, torch.Tensor], w_feat: float
) -> torch.Tensor:
    """L1(student, FP teacher) + w_feat * mean over stages of the normalised feature distance."""
    with torch.no_grad(), fp_mode(model):
        target = model(batch)
        teacher = {k: v.detach() for k, v in feats.items()}
    loss = F.l1_loss(model(batch), target)
    if stages and w_feat:
        loss = loss + w_feat * sum(normalised_feature_distance(feats[k], teacher[k]) for k in stages) / len(stages)
    return loss


def run_adabm(
    model: nn.Module,
    layout: QuantLayout,
    w_bits: int,
    a_bits: int,
    draw_batch: Callable[[int], torch.Tensor],
    config: AdaBMConfig,
    full: bool = False,
    progress: bool = False,
) -> AdaBMResult:
    """Quantize `model` in place, calibrate it and fit AdaBM's bounds and bit measures from LR crops.

    `draw_batch(n)` returns n LR crops in [0, 1]. The model is left in eval mode, quantized, with the
    returned controller attached (every forward picks its own per-image bits).
    """
    if not 3 <= a_bits <= 14:
        raise SrquantError(f"AdaBM needs base activation bits in [3, 14] (bits vary by +-2), got {a_bits}")
    if not 2 <= w_bits <= 16:
        raise SrquantError(f"AdaBM's symmetric weight quantizer needs w_bits in [2, 16], got {w_bits}")
    start = time.perf_counter()
    model.eval()
    spec = QuantSpec(w_bits, a_bits, weight_quantizer="symmetric", full=full, matmul=False)
    report = quantize_(model, spec, layout)
    adaptive = tuple(name for name in report.layers if matches(name, layout.body))
    if not adaptive:
        raise SrquantError("AdaBM found no adaptive layers: the layout's body matched nothing")
    controller = BitController(adaptive, a_bits, config.image2bit, config.layer2bit)
    sizes = [min(config.calib_batch, config.calib_count - i) for i in range(0, config.calib_count, config.calib_batch)]
    calib = [draw_batch(n) for n in sizes]
    calibrate_adabm(model, controller, calib, config)
    handle = attach_controller(model, controller)
    result = AdaBMResult(controller, handle, report, adaptive, config)
    if config.bit_aware_clipping:
        bit_aware_clipping(model, controller, draw_batch(config.batch_size), config)
    result.calib_seconds = time.perf_counter() - start
    _fine_tune(model, controller, calib, draw_batch, config, result, progress)
    result.seconds = time.perf_counter() - start
    return result


def _decay(optimizer: torch.optim.Optimizer | None, gamma: float) -> None:
    """StepLR(step_size=1, gamma) of the phase that just ended: the original steps only that phase's scheduler,
    so each learning rate decays once per epoch of its own phase."""
    if optimizer is not None:
        for group in optimizer.param_groups:
            group["lr"] *= gamma


def _fine_tune(
    model: nn.Module,
    controller: BitController,
    calib: Sequence[torch.Tensor],
    draw_batch: Callable[[int], torch.Tensor],
    config: AdaBMConfig,
    result: AdaBMResult,
    progress: bool,
) -> None:
    """Phase-cycled distillation with a divergence guard that restores every trainable method parameter."""
    if config.epochs == 0 or config.iterations == 0:
        return
    groups = _method_parameters(model, controller)
    controller_params = set(map(id, groups["bit"]))
    trainable = [p for phase in PHASES for p in groups[phase]]
    bit_groups: list[dict[str, object]] = []  # only the switched-on adaptations are given to an optimizer
    if controller.image2bit:
        bit_groups.append({"params": [controller.measure_l, controller.measure_u], "lr": config.lr_measure_img})
    if controller.layer2bit:
        bit_groups.append({"params": [controller.measure_layer], "lr": config.lr_measure_layer})
    optimizers = {
        "weight": torch.optim.Adam(groups["weight"], lr=config.lr_w, betas=config.betas),
        "activation": torch.optim.Adam(groups["activation"], lr=config.lr_a, betas=config.betas),
    }
    if bit_groups:
        optimizers["bit"] = torch.optim.Adam(bit_groups, betas=config.betas)
    stages = tuple(getattr(model, "stage_names", ()))
    generator = torch.Generator().manual_seed(config.seed)
    good = [p.detach().clone() for p in trainable]

    def restore() -> None:
        with torch.no_grad():
            for p, saved in zip(trainable, good, strict=True):
                p.copy_(saved)

    def blown(value: float, distill: float, recent: list[float]) -> tuple[bool, float]:
        median = sorted(recent)[len(recent) // 2] if recent else math.inf
        return (not math.isfinite(value) or (bool(recent) and distill > config.blowup_factor * median)), median

    with capture_stages(model, stages) as feats, torch.no_grad():
        # The guard's history starts from the calibrated model's own batch-to-batch spread, so a blow-up in the
        # very first steps is caught too (the history would otherwise be filled by the diverging losses).
        chunks = [c for b in calib for c in b.split(config.batch_size)][: config.guard_seed_batches]
        recent = [float(_distill_loss(model, c, stages, feats, config.feature_weight)) for c in chunks]
    recent = [v for v in recent if math.isfinite(v)]
    total = config.epochs * config.iterations
    bar = tqdm(total=total, desc="AdaBM", disable=not progress, leave=False)
    for epoch in range(config.epochs):
        phase = PHASES[epoch % len(PHASES)]
        active = groups[phase]
        if not active:  # a bit phase with both adaptations off: same batches drawn, no step taken
            for _ in range(config.iterations):
                draw_batch(config.batch_size)
                if config.augment:
                    torch.randint(8, (1,), generator=generator)
            bar.update(config.iterations)
            continue
        optimizer = optimizers[phase]
        active_ids = set(map(id, active))
        for p in controller.parameters():
            p.requires_grad_(id(p) in active_ids)
        model_active = [p for p in active if id(p) not in controller_params]
        with frozen_weights(model, model_active), capture_stages(model, stages) as feats:
            for step in range(config.iterations):
                bar.update(1)
                batch = draw_batch(config.batch_size)
                if config.augment:
                    batch = dihedral(batch, int(torch.randint(8, (1,), generator=generator)))
                distill = _distill_loss(model, batch, stages, feats, config.feature_weight)
                loss = distill
                if phase == "bit" and config.bit_weight and controller.last_bits is not None:
                    loss = loss + config.bit_weight * (controller.last_bits.mean() - controller.base_bits).clamp_min(0)
                value, distill_value = float(loss.detach()), float(distill.detach())
                bad, median = blown(value, distill_value, recent)
                if bad:
                    restore()
                    for group in optimizer.param_groups:
                        group["lr"] *= 0.5
                    optimizer.state.clear()
                    result.rollbacks.append(
                        f"epoch {epoch} ({phase} phase) step {step}: loss {value:.4g} (median {median:.4g}); "
                        f"all bounds and bit measures restored, {phase} learning rate halved"
                    )
                    if len(result.rollbacks) >= config.max_rollbacks:
                        result.stopped_early = True
                        break
                    continue
                good = [p.detach().clone() for p in trainable]  # the state that just gave a sound loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                recent = (recent + [distill_value])[-50:]
                result.losses.append(value)
                result.phases.append(phase)
                bar.set_postfix(phase=phase, loss=f"{value:.4f}")
        _decay(optimizers.get(phase), config.lr_gamma)
        if result.stopped_early:
            break
    bar.close()
    for p in controller.parameters():
        p.requires_grad_(True)
    if not result.stopped_early:  # the last update has not been checked by any loss yet
        with capture_stages(model, stages) as feats, torch.no_grad():
            final = float(_distill_loss(model, draw_batch(config.batch_size), stages, feats, config.feature_weight))
        bad, median = blown(final, final, recent)
        if bad:
            restore()
            result.rollbacks.append(f"final check: loss {final:.4g} (median {median:.4g}); last good state restored")
