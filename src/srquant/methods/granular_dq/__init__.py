"""Granular-DQ (Wang et al., AAAI 2025): patch-wise, layer-invariant activation bits for SR networks.

Every quantized body layer of an LR patch quantizes its input at the same bit, chosen per patch:

1. GBC (granularity-bit controller): the output of the model's FP head conv is average-pooled to several
   grids (4x4, 2x2, 1x1 by default), each grid GroupNormed and flattened, the granularities concatenated and
   mapped by one linear layer to logits over {4, 6, 8}. Training draws a hard Gumbel-softmax sample with a
   straight-through gradient (seeded generator); eval mode takes the argmax of the logits (never random).
2. E2B (entropy-to-bit): a patch that GBC sent to 8 bits is re-coded by the Gaussian-KDE histogram entropy of
   its grayscale LR pixels: entropy <= t1 -> 4, <= t2 -> 5, else 8 (t1, t2 = the 0.5 / 0.9 quantiles of the
   calibration patches' entropies).
3. ATC: during the first epoch only, t <- gamma t + (1 - gamma) q(E_batch) for each threshold.
4. Quantizers: per body layer one LSQ activation quantizer per candidate bit {4, 5, 6, 8} (`MultiBitLSQ`),
   only the selected bit's quantizer runs on its samples; weights are 8-bit signed LSQ.
5. Training: QAT with L1 to HR crops (the paper) or distillation from the same network in `fp_mode`.

Switches (`GranularDQConfig`, saved with the controller's state): `e2b=False` keeps GBC's bit for every patch
(the paper's Table 3 "+GBC" row; ATC then has no thresholds to calibrate, so `atc=False` is required), `atc=False`
leaves the thresholds at their calibrated values ("+GBC+E2B"); both on is the full method. `fixed_bits=b` is the
fixed-bit baseline: every body layer gets one LSQ activation quantizer at b (b must be one of `act_bits`), every
patch runs at b through the same patch-wise inference and the same training schedule and batches; the controller
is neither trained nor consulted (FAB = b).

Choices and departures (the paper's Eq. 3-7 and the released inference-only code):
- GBC input: the output of the model's head conv, i.e. the first `nn.Conv2d` in module order that is neither
  in the layout's body nor in its `never` list (imdn `fea_conv`, pan `conv_first`, edsr-baseline/srresnet
  `head.0`, carn-m `entry`, swinir-light `conv_first`). It runs in FP; its output is taken with a forward hook,
  so no extra head computation is done.
- Granularities keep their spatial grid (pooled to g x g, flattened) instead of the paper's GAP after pooling,
  which makes every granularity collapse to the same channel mean (the released code's three identical
  inputs). GroupNorm is applied per granularity (the released code comments it out).
- At inference only the selected bit's quantizer runs. In training every code's bit runs and the output is
  sum_k y_k * Q_{b_k}(x) with the straight-through one-hot y (forward value: exactly the selected Q), so each
  logit's gradient compares its own bit's output with the others (b_k is the bit code k leads to for that
  patch: E2B's bit for the top code). A single-path gate (output = Q_b(x) * y_b) gives the logits only
  <dL/dy, y>, which says nothing about the other bits: on IMDN x4 the controller then drifted to 4 bits for
  every patch (FAB 4.00). An optional bit penalty (`bit_penalty`, default 0: the paper has no bit loss)
  adds `bit_penalty * mean(expected bit) / 8` using the soft probabilities.
- Entropy thresholds are kept in entropy units (nats) so a single test patch needs no batch statistics; ATC's
  "normalised" batch value is the batch quantile at the same probability (a rank normalisation). The released
  code's rounding of the ratio to tenths and its missing-key lookup are not reproduced.
- Rounding is straight-through (the released code's tanh surrogate is not used). The weight step starts at
  max|W| / Qp by default (`weight_init="max"`): the code's 2 max|W| / sqrt(Qp) uses only about +-6 of the 127
  levels; `weight_init="paper"` gives it.
- The model stays in eval mode (no BatchNorm statistics move); the controller alone is put in train mode.

Modules: `config`, `entropy` (E2B's patch entropy), `controller` (GBC + E2B + ATC and its wiring), `training`
(quantization, calibration, the training loop), `patchwise` (patch-wise inference, bit accounting, bit maps and
the `PatchwiseBitsModel` that `srquant eval` runs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from srquant.errors import SrquantError
from srquant.methods.base import CalibrationData, Method, MethodRun
from srquant.methods.granular_dq.config import GRANULAR_DQ_PRESETS, GranularDQConfig
from srquant.methods.granular_dq.controller import (
    GranularityBitController,
    attach_controller,
    head_conv_name,
    multibit_quantizers,
)
from srquant.methods.granular_dq.entropy import patch_entropy
from srquant.methods.granular_dq.patchwise import (
    PALETTE,
    ImageBitReport,
    PatchBit,
    PatchwiseBitsModel,
    bit_map,
    image_bit_report,
    patch_boxes,
    upscale_patchwise,
)
from srquant.methods.granular_dq.training import (
    GranularDQResult,
    calibrate_granular,
    quantize_granular,
    run_granular_dq,
)
from srquant.models.layout import QuantLayout
from srquant.quant.quantize import quantize_
from srquant.quant.quantizers import MultiBitLSQ
from srquant.quant.spec import QuantSpec

__all__ = [
    "GRANULAR_DQ_PRESETS",
    "PALETTE",
    "GranularDQ",
    "GranularDQConfig",
    "GranularDQResult",
    "GranularityBitController",
    "ImageBitReport",
    "PatchBit",
    "PatchwiseBitsModel",
    "attach_controller",
    "bit_map",
    "calibrate_granular",
    "checkpoint_state",
    "head_conv_name",
    "image_bit_report",
    "multibit_quantizers",
    "patch_boxes",
    "patch_entropy",
    "quantize_granular",
    "run_granular_dq",
    "upscale_patchwise",
]


def checkpoint_state(network: nn.Module, result: GranularDQResult) -> dict[str, Any]:
    """What a checkpoint keeps of a Granular-DQ run: config, head conv, multi-bit layers, controller state."""
    layers = [
        {"name": name, "bits": list(q.candidate_bits), "signed": bool(q.signed)}
        for name, q in zip(result.layers, multibit_quantizers(network, result.controller), strict=True)
    ]
    return {
        "config": dataclasses.asdict(result.config),
        "head": result.head,
        "layers": layers,
        "controller": result.controller.state_dict(),
    }


class GranularDQ(Method):
    """Patch-wise activation bits among act_bits (or one fixed_bits), LSQ weights at w_bits, body only.

    The spec's a_bits is not used (the candidate bits come from the config). The E2B thresholds are calibrated on
    LR patches of the test patch size (`entropy_patch`, 96) or, when the calibration images are too small for it,
    the largest multiple of 8 that most of them hold (`settings["entropy_patch"]`).
    """

    name = "granular-dq"
    summary = "Granular-DQ: one activation bit per LR patch from a granularity-bit controller and patch entropy"
    config_type = GranularDQConfig
    presets = {**GRANULAR_DQ_PRESETS, "code": GRANULAR_DQ_PRESETS["paper"]}
    dynamic = True

    def config(self, preset: str, overrides: Mapping[str, Any] | None = None) -> GranularDQConfig:
        """Overriding `iterations` alone scales the schedule with it: the LR milestones and the first epoch (ATC's
        window) keep their fractions of the run, so a longer or shorter run is the same schedule stretched."""
        given = {k: v for k, v in (overrides or {}).items() if v is not None}
        base = self.presets.get(preset)
        iterations = given.get("iterations")
        if base is not None and isinstance(iterations, int) and base.iterations > 0:
            ratio = iterations / base.iterations
            given.setdefault("lr_milestones", tuple(round(m * ratio) for m in base.lr_milestones))
            given.setdefault("epoch_iterations", round(base.epoch_iterations * ratio))
        return super().config(preset, given)

    def fixed_twin(self, a_bits: int) -> dict[str, Any]:
        """No controller: every patch at a_bits (one of act_bits), same training schedule and batches."""
        return {"fixed_bits": a_bits}

    def run(
        self,
        model: nn.Module,
        layout: QuantLayout,
        spec: QuantSpec,
        data: CalibrationData,
        config: GranularDQConfig,
        progress: bool = False,
    ) -> MethodRun:
        if spec.full:
            raise SrquantError("Granular-DQ quantizes the body only; --full does not apply")
        if spec.output_bits is not None:
            raise SrquantError("Granular-DQ's bits change per patch: --output-bits/--glue-bits do not apply")
        config = dataclasses.replace(config, w_bits=spec.w_bits)
        crop = data.rounded(config.patch)
        draw = data.stream(crop, config.seed, with_hr=config.loss == "qat")
        entropy_patch = data.fitting_size(config.entropy_patch)
        draw_entropy = data.stream(entropy_patch, config.seed + 1)  # its own stream: training batches do not change
        result = run_granular_dq(
            model, layout, draw, config, progress, draw_entropy_batch=draw_entropy, granularity=spec.weight_granularity
        )
        result.attachment.detach(model, result.controller)
        wrapped = PatchwiseBitsModel(model, result.controller, result.head)
        settings = {
            "granular_dq": self.settings(config),
            "crop": crop,
            "entropy_patch": entropy_patch,
            "entropy_count": config.calib_count,
            "bit_price": result.bit_price,
            "distortion_fit": result.distortion_fit,
        }
        state = checkpoint_state(model, result)
        return MethodRun(
            wrapped, result.report, result.spec, result.seconds, settings, state, result.rollbacks, result.losses
        )

    def rebuild(self, network: nn.Module, layout: QuantLayout, spec: QuantSpec, state: dict[str, Any] | None) -> None:
        quantize_(network, spec, layout)
        if not state:
            raise SrquantError("a Granular-DQ checkpoint must hold its controller and layers")
        device = next((p.device for p in network.parameters()), torch.device("cpu"))
        for layer in state["layers"]:
            module = network.get_submodule(layer["name"])
            if not hasattr(module, "input_quantizer"):
                raise SrquantError(f"Granular-DQ layer {layer['name']} of the checkpoint is not a quantized layer")
            bits = [int(b) for b in layer["bits"]]
            module.input_quantizer = MultiBitLSQ(bits, signed=bool(layer["signed"])).to(device)

    def inference_model(self, network: nn.Module, state: dict[str, Any] | None) -> nn.Module:
        assert state is not None
        fields = {f.name for f in dataclasses.fields(GranularDQConfig)}
        config = GranularDQConfig(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in state["config"].items() if k in fields}
        )
        names = [layer["name"] for layer in state["layers"]]
        head = state["head"]
        device = next((p.device for p in network.parameters()), torch.device("cpu"))
        controller = GranularityBitController(names, network.get_submodule(head).out_channels, config)
        controller.load_state_dict(state["controller"], strict=True)
        return PatchwiseBitsModel(network, controller.to(device).eval(), head)


GRANULAR_DQ = GranularDQ()
