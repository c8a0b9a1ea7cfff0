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

Switches (`GranularDQConfig`, saved with the controller's state; a state saved before they existed loads with
the defaults): `e2b=False` keeps GBC's bit for every patch (the paper's Table 3 "+GBC" row; ATC then has no
thresholds to calibrate, so `atc=False` is required), `atc=False` leaves the thresholds at their calibrated values
("+GBC+E2B"); both on is the full method. `fixed_bits=b` is the fixed-bit baseline: every body layer gets one LSQ
activation quantizer at b (b must be one of `act_bits`), every patch runs at b through the same patch-wise
inference and the same training schedule and batches; the controller is neither trained nor consulted (FAB = b).

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
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle
from tqdm import tqdm

from srquant.errors import SrquantError
from srquant.methods.twodquant import dihedral
from srquant.metrics.complexity import OpsReport, bitops
from srquant.models.layout import QuantLayout
from srquant.quant.accounting import ops_report
from srquant.quant.quantize import QuantReport, fp_mode, mode_scope, quantize_, quantizers, set_mode
from srquant.quant.quantizers import LSQQuantizer, Quantizer, QuantMode, straight_through
from srquant.quant.spec import QuantSpec, matches

log = logging.getLogger(__name__)
GRAY = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma (kornia's rgb_to_grayscale)
PALETTE: dict[int, tuple[int, int, int]] = {
    4: (220, 40, 40),
    5: (240, 140, 20),
    6: (230, 220, 40),
    8: (40, 170, 60),
}
Batch = torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]


@dataclass(frozen=True)
class GranularDQConfig:
    """Granular-DQ schedule and hyper-parameters; `GRANULAR_DQ_PRESETS` holds the paper's run and a CPU one."""

    iterations: int = 300_000
    batch_size: int = 16
    patch: int = 48  # LR crop size the caller's draw_batch should produce (informational)
    lr: float = 2e-4
    lr_milestones: tuple[int, ...] = (250_000,)
    lr_gamma: float = 0.5
    betas: tuple[float, float] = (0.9, 0.999)
    loss: str = "qat"  # "qat": L1 to HR crops; "distill": L1 to the FP network on LR crops
    act_bits: tuple[int, ...] = (4, 5, 6, 8)
    gbc_bits: tuple[int, ...] = (4, 6, 8)
    e2b_bits: tuple[int, int, int] = (4, 5, 8)
    e2b_quantiles: tuple[float, float] = (0.5, 0.9)
    entropy_bins: int = 32
    entropy_sigma: float = 0.0255  # 0.0001 * 255 in [0, 1] units, the released code's value
    atc_gamma: float = 0.9997
    epoch_iterations: int = 1000  # "first epoch" for ATC: EDSR-PyTorch's 1000-iteration epoch
    grids: tuple[int, ...] = (4, 2, 1)
    gn_groups: int = 4
    tau: float = 1.0
    w_bits: int = 8
    weight_init: str = "max"
    bit_penalty: float = 0.0
    calib_count: int = 256
    calib_batch: int = 16
    augment: bool = True
    seed: int = 0
    blowup_factor: float = 4.0
    max_rollbacks: int = 5
    guard_seed_batches: int = 4
    e2b: bool = True  # entropy-to-bit re-coding of the patches GBC sent to its top bit
    atc: bool = True  # adaptive threshold calibration (EMA) during the first epoch; needs e2b
    fixed_bits: int | None = None  # fixed-bit baseline: every patch at this bit, no controller
    entropy_patch: int = 96  # LR size of the threshold-calibration patches (the test patch; informational)

    @property
    def candidate_bits(self) -> tuple[int, ...]:
        """The activation bits each body layer gets a quantizer for: act_bits, or the fixed bit alone."""
        return (self.fixed_bits,) if self.fixed_bits is not None else tuple(self.act_bits)

    def __post_init__(self) -> None:
        if self.iterations < 0 or self.epoch_iterations < 0:
            raise SrquantError("Granular-DQ needs iterations >= 0 and epoch_iterations >= 0")
        if min(self.batch_size, self.patch, self.calib_count, self.calib_batch, self.entropy_bins) < 1:
            raise SrquantError("Granular-DQ batch sizes, patch, calibration count and bins must be positive")
        if not self.lr > 0 or not 0 < self.lr_gamma <= 1 or not self.tau > 0 or not self.entropy_sigma > 0:
            raise SrquantError("Granular-DQ needs lr > 0, lr_gamma in (0, 1], tau > 0 and entropy_sigma > 0")
        if self.loss not in ("qat", "distill"):
            raise SrquantError(f"Granular-DQ loss must be 'qat' or 'distill', got {self.loss!r}")
        if self.weight_init not in ("max", "paper"):
            raise SrquantError(f"Granular-DQ weight_init must be 'max' or 'paper', got {self.weight_init!r}")
        if any(not 2 <= b <= 16 for b in (*self.act_bits, self.w_bits)) or len(set(self.act_bits)) != len(
            self.act_bits
        ):
            raise SrquantError("Granular-DQ bit-widths must be distinct integers in [2, 16]")
        if not set(self.gbc_bits) <= set(self.act_bits) or not set(self.e2b_bits) <= set(self.act_bits):
            raise SrquantError("Granular-DQ gbc_bits and e2b_bits must be among act_bits")
        if len(self.gbc_bits) < 2 or len(self.e2b_bits) != 3:
            raise SrquantError("Granular-DQ needs >= 2 GBC bits and exactly 3 E2B codes")
        q1, q2 = self.e2b_quantiles
        if not 0 < q1 < q2 < 1:
            raise SrquantError(f"Granular-DQ E2B quantiles must satisfy 0 < q1 < q2 < 1, got {self.e2b_quantiles}")
        if not 0 <= self.atc_gamma <= 1:
            raise SrquantError(f"Granular-DQ atc_gamma must be in [0, 1], got {self.atc_gamma}")
        if not self.grids or min(self.grids) < 1 or self.gn_groups < 1:
            raise SrquantError("Granular-DQ grids and gn_groups must be positive")
        if self.bit_penalty < 0 or not self.blowup_factor > 1 or self.max_rollbacks < 1:
            raise SrquantError("Granular-DQ needs bit_penalty >= 0, blowup_factor > 1 and max_rollbacks >= 1")
        if self.atc and not self.e2b:
            raise SrquantError("Granular-DQ ATC calibrates E2B's thresholds: e2b=False needs atc=False")
        if self.fixed_bits is not None and (isinstance(self.fixed_bits, bool) or self.fixed_bits not in self.act_bits):
            raise SrquantError(f"Granular-DQ fixed_bits must be one of act_bits {self.act_bits}, got {self.fixed_bits}")
        if self.entropy_patch < 1:
            raise SrquantError(f"Granular-DQ entropy_patch must be positive, got {self.entropy_patch}")


GRANULAR_DQ_PRESETS: dict[str, GranularDQConfig] = {
    # Paper, Implementation details: 300K iterations, batch 16, LR 48x48, Adam 2e-4 halved at 250K, gamma 0.9997.
    "paper": GranularDQConfig(),
    # The same algorithm sized for a 2-core CPU (IMDN/PAN x4 meant to finish well within an hour; untimed).
    "cpu": GranularDQConfig(
        iterations=200,
        batch_size=4,
        patch=32,
        lr_milestones=(160,),
        epoch_iterations=50,
        calib_count=32,
        calib_batch=8,
    ),
}


def get_granular_dq_preset(name: str, **overrides: object) -> GranularDQConfig:
    """A named preset with some fields replaced (None values are ignored).

    Overriding `iterations` alone scales the schedule with it: the LR milestones and the first epoch (ATC's
    window) keep their fractions of the run, so a longer or shorter run is the same schedule stretched.
    """
    if name not in GRANULAR_DQ_PRESETS:
        raise SrquantError(f"unknown Granular-DQ preset {name!r}; choose from {', '.join(GRANULAR_DQ_PRESETS)}")
    base = GRANULAR_DQ_PRESETS[name]
    given = {k: v for k, v in overrides.items() if v is not None}
    iterations = given.get("iterations")
    if isinstance(iterations, int) and base.iterations > 0:
        ratio = iterations / base.iterations
        given.setdefault("lr_milestones", tuple(round(m * ratio) for m in base.lr_milestones))
        given.setdefault("epoch_iterations", round(base.epoch_iterations * ratio))
    return dataclasses.replace(base, **given)


# ----------------------------------------------------------------------------------------------- quantizer


class MultiBitLSQ(Quantizer):
    """One LSQ activation quantizer per candidate bit; each sample is quantized only by its selected bit's one.

    `select(bits, gate, alternatives)` sets the per-sample bits (B,) and, for training, the straight-through
    one-hot gate (B, n) over the controller's codes with the bit each code leads to (B, n): the output is then
    sum_k gate_k * Q_{alternatives_k}(x), exactly the selected Q forward. Without a selection the widest
    candidate is used.
    """

    def __init__(self, bits: Sequence[int], signed: bool = True) -> None:
        super().__init__(max(bits))
        self.candidate_bits = tuple(sorted(int(b) for b in bits))
        self.candidates = nn.ModuleDict({str(b): LSQQuantizer(b, signed=signed) for b in self.candidate_bits})
        self.sample_bits: torch.Tensor | None = None
        self.gate: torch.Tensor | None = None
        self.alternatives: torch.Tensor | None = None

    @property
    def signed(self) -> bool:
        """Whether the candidates use a signed grid (set at calibration)."""
        return next(iter(self.candidates.values())).signed  # type: ignore[union-attr]

    def set_signed(self, signed: bool) -> None:
        """Switch every candidate between signed and unsigned grids."""
        for q in self.candidates.values():
            q.signed = signed  # type: ignore[union-attr]

    def init_steps(self, mean_abs: float) -> None:
        """LSQ's initial step 2 mean|x| / sqrt(Qp) for every candidate, from the calibration mean |x|."""
        for q in self.candidates.values():
            _, qp = q.qrange()  # type: ignore[operator]
            with torch.no_grad():
                q.step.fill_(max(2 * mean_abs / math.sqrt(qp), 1e-8))  # type: ignore[operator,union-attr]

    def select(
        self, bits: torch.Tensor | None, gate: torch.Tensor | None = None, alternatives: torch.Tensor | None = None
    ) -> None:
        """Set the per-sample bits (and, in training, the one-hot gate with each code's bit) for the next passes."""
        if gate is not None and (alternatives is None or gate.shape != alternatives.shape):
            raise SrquantError("a Granular-DQ gate needs the bit of every code: alternatives of the gate's shape")
        self.sample_bits = bits
        self.gate = gate
        self.alternatives = alternatives

    def _expand(self, values: torch.Tensor, n: int) -> torch.Tensor:
        """Per-sample values repeated for inputs whose leading dim is batch-major (e.g. windows per image)."""
        if values.shape[0] == n:
            return values
        if n % values.shape[0]:
            raise SrquantError(f"input batch {n} is not a multiple of the {values.shape[0]} selected bits")
        return values.repeat_interleave(n // values.shape[0])

    def _check(self, bits: torch.Tensor) -> list[int]:
        present = torch.unique(bits).tolist()
        unknown = [b for b in present if b not in self.candidate_bits]
        if unknown:
            raise SrquantError(f"bit {unknown[0]} is not a candidate of this quantizer {self.candidate_bits}")
        return present

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.sample_bits is None:
            return self.candidates[str(self.bits)](x)
        if self.gate is not None and self.alternatives is not None:
            return self._mixture(x)
        bits = self._expand(self.sample_bits, x.shape[0])
        present = self._check(bits)
        if len(present) == 1:
            return self.candidates[str(present[0])](x)
        out = x.new_zeros(x.shape)
        for b in present:
            idx = (bits == b).nonzero(as_tuple=True)[0]
            out = out.index_put((idx,), self.candidates[str(b)](x[idx]))
        return out

    def _mixture(self, x: torch.Tensor) -> torch.Tensor:
        """Training: sum over codes of gate_k * Q_{bit of k}(x); forward value is the selected Q exactly."""
        assert self.gate is not None and self.alternatives is not None
        n = x.shape[0]
        gate = torch.stack([self._expand(self.gate[:, k], n) for k in range(self.gate.shape[1])], dim=1)
        alternatives = torch.stack(
            [self._expand(self.alternatives[:, k], n) for k in range(self.alternatives.shape[1])], dim=1
        )
        shape = (-1, *[1] * (x.dim() - 1))
        out = x.new_zeros(x.shape)
        for b in self._check(alternatives):
            weight = (gate * (alternatives == b)).sum(dim=1)  # 1 for the selected bit's samples, else 0
            out = out + weight.view(shape) * self.candidates[str(b)](x)
        return out

    def extra_repr(self) -> str:
        return f"bits={self.candidate_bits}, mode={self.mode.value}, {'signed' if self.signed else 'unsigned'}"


# ------------------------------------------------------------------------------------------------- entropy


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) luma of an RGB batch in [0, 1] (the channel mean for other channel counts)."""
    if x.shape[1] == 3:
        return sum(w * x[:, i : i + 1] for i, w in enumerate(GRAY))  # type: ignore[return-value]
    return x.mean(dim=1, keepdim=True)


def patch_entropy(x: torch.Tensor, bins: int = 32, sigma: float = 0.0255) -> torch.Tensor:
    """Per-sample Gaussian-KDE histogram entropy (nats) of the grayscale image: soft counts at bin centres on [0, 1]."""
    if x.dim() == 3:
        x = x.unsqueeze(0)
    gray = grayscale(x.detach().float()).clamp(0, 1).flatten(1)  # (B, N)
    centres = (torch.arange(bins, dtype=torch.float32, device=x.device) + 0.5) / bins
    out = []
    for row in gray:  # one sample at a time: N x bins stays small for 96x96 patches
        weights = torch.exp(-0.5 * ((row[:, None] - centres[None, :]) / sigma) ** 2).sum(dim=0)
        p = weights / weights.sum().clamp_min(1e-12)
        out.append(-(p * torch.log(p.clamp_min(1e-12))).sum())
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------- controller


class GranularityBitController(nn.Module):
    """GBC + E2B + ATC: per-patch bits from the head-conv features and the LR patch's entropy.

    Training mode samples a hard Gumbel-softmax (seeded `generator`) with a straight-through gradient; eval
    mode (or `stochastic=False`) takes the argmax, so test-time bits never depend on random numbers.
    """

    def __init__(self, layer_names: Sequence[str], channels: int, config: GranularDQConfig) -> None:
        super().__init__()
        self.layer_names = tuple(layer_names)
        self.gbc_bits = tuple(config.gbc_bits)
        self.e2b_bits = tuple(config.e2b_bits)
        self.grids = tuple(config.grids)
        self.tau = config.tau
        self.bins, self.sigma = config.entropy_bins, config.entropy_sigma
        self.quantiles = tuple(config.e2b_quantiles)
        self.atc_gamma = config.atc_gamma
        self.use_e2b, self.use_atc, self.fixed_bits = config.e2b, config.atc, config.fixed_bits
        # At least 2 channels per group, so the 1x1 granularity (and a batch of one patch) is normalisable.
        groups = max([d for d in range(1, config.gn_groups + 1) if channels % d == 0 and channels // d >= 2] or [1])
        self.norms = nn.ModuleList(nn.GroupNorm(groups, channels) for _ in self.grids)
        self.fc = nn.Linear(channels * sum(g * g for g in self.grids), len(self.gbc_bits))
        init = torch.Generator().manual_seed(config.seed)
        bound = 1 / math.sqrt(self.fc.in_features)
        with torch.no_grad():
            self.fc.weight.uniform_(-bound, bound, generator=init)
            self.fc.bias.uniform_(-bound, bound, generator=init)
        self.register_buffer("thresholds", torch.tensor([0.0, math.inf]))
        self.register_buffer("atc_updates", torch.tensor(0, dtype=torch.int64))
        self.generator = torch.Generator().manual_seed(config.seed)
        self.stochastic: bool | None = None
        self.last_bits: torch.Tensor | None = None
        self.last_gbc_bits: torch.Tensor | None = None
        self.last_expected_bits: torch.Tensor | None = None

    def get_extra_state(self) -> dict[str, object]:
        """Layer names, bit codes and switches travel with the state: a reload gives the same bits or fails."""
        return {
            "layer_names": list(self.layer_names),
            "gbc_bits": list(self.gbc_bits),
            "e2b": list(self.e2b_bits),
            "use_e2b": self.use_e2b,
            "use_atc": self.use_atc,
            "fixed_bits": self.fixed_bits,
        }

    def set_extra_state(self, state: dict[str, object]) -> None:
        """Refuse a state saved for other layers or other bit codes; take its switches (absent = the defaults)."""
        mine = self.get_extra_state()
        if any(list(state[k]) != mine[k] for k in ("layer_names", "gbc_bits", "e2b")):  # type: ignore[call-overload]
            raise SrquantError("Granular-DQ controller state was saved for other layers or bit codes")
        self.use_e2b = bool(state.get("use_e2b", True))  # states written before the switches: full method
        self.use_atc = bool(state.get("use_atc", True))
        fixed = state.get("fixed_bits")
        self.fixed_bits = None if fixed is None else int(fixed)  # type: ignore[call-overload]

    def reseed(self, seed: int) -> None:
        """Restart the Gumbel noise sequence."""
        self.generator.manual_seed(seed)

    def granularity_features(self, feat: torch.Tensor) -> list[torch.Tensor]:
        """Per granularity g: the feature average-pooled to a g x g grid, GroupNormed, flattened (B, C*g*g)."""
        return [norm(F.adaptive_avg_pool2d(feat, g)).flatten(1) for g, norm in zip(self.grids, self.norms, strict=True)]

    def logits(self, feat: torch.Tensor) -> torch.Tensor:
        """GBC logits over `gbc_bits` from the head-conv features."""
        return self.fc(torch.cat(self.granularity_features(feat), dim=1))

    def is_stochastic(self) -> bool:
        """Gumbel sampling in training mode unless overridden by `stochastic`."""
        return self.training if self.stochastic is None else self.stochastic

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """Straight-through one-hot (B, n): hard Gumbel-softmax sample in training, argmax in eval."""
        if self.is_stochastic():
            u = torch.rand(logits.shape, generator=self.generator).to(logits.device).clamp(1e-10, 1 - 1e-10)
            soft = F.softmax((logits - torch.log(-torch.log(u))) / self.tau, dim=-1)
        else:
            soft = F.softmax(logits / self.tau, dim=-1)
        hard = F.one_hot(soft.argmax(dim=-1), len(self.gbc_bits)).to(soft.dtype)
        return straight_through(soft, hard)

    def e2b(self, entropy: torch.Tensor) -> torch.Tensor:
        """Entropy -> bit code: <= t1 -> e2b[0], <= t2 -> e2b[1], else e2b[2]."""
        t1, t2 = self.thresholds[0], self.thresholds[1]
        low, mid, high = self.e2b_bits
        codes = torch.full_like(entropy, high, dtype=torch.int64)
        codes[entropy <= t2] = mid
        codes[entropy <= t1] = low
        return codes

    @torch.no_grad()
    def calibrate_thresholds(self, entropies: torch.Tensor) -> None:
        """E2B thresholds = the configured quantiles of the calibration patches' entropies."""
        q = torch.quantile(entropies.float(), torch.tensor(self.quantiles))
        self.thresholds.copy_(q)

    @torch.no_grad()
    def atc_update(self, entropies: torch.Tensor) -> None:
        """ATC: one EMA step of each threshold towards the batch entropy quantile at the same probability."""
        q = torch.quantile(entropies.float(), torch.tensor(self.quantiles))
        self.thresholds.mul_(self.atc_gamma).add_((1 - self.atc_gamma) * q)
        self.thresholds[1] = torch.maximum(self.thresholds[1], self.thresholds[0])
        self.atc_updates += 1

    def forward(self, feat: torch.Tensor, lr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample bits (B,) int64, the straight-through one-hot gate (B, n) over the GBC codes, and the bit
        each code leads to for each sample (B, n): the code itself, or E2B's bit for the top code."""
        if self.fixed_bits is not None:  # fixed-bit baseline: no GBC, no E2B, no gradient to the controller
            bits = torch.full((feat.shape[0],), self.fixed_bits, dtype=torch.int64, device=feat.device)
            self.last_gbc_bits, self.last_bits, self.last_expected_bits = bits, bits, bits.float()
            return bits, torch.ones(bits.shape[0], 1, device=feat.device), bits[:, None]
        onehot = self.choose(self.logits(feat))
        codes = torch.tensor(self.gbc_bits, dtype=onehot.dtype, device=onehot.device)
        index = onehot.detach().argmax(dim=-1)
        gbc = codes[index].to(torch.int64)
        alternatives = codes.to(torch.int64).expand(onehot.shape[0], -1).clone()
        top_code = len(self.gbc_bits) - 1 - list(reversed(self.gbc_bits)).index(max(self.gbc_bits))
        if self.use_e2b:
            alternatives[:, top_code] = self.e2b(patch_entropy(lr, self.bins, self.sigma).to(feat.device))
        bits = alternatives.gather(1, index[:, None]).squeeze(1)
        self.last_gbc_bits, self.last_bits = gbc, bits
        self.last_expected_bits = (onehot * codes).sum(dim=-1)  # hard value, soft-probability gradient
        return bits, onehot, alternatives


# ------------------------------------------------------------------------------------------------- wiring


def head_conv_name(model: nn.Module, layout: QuantLayout) -> str:
    """The head conv that feeds GBC: the first Conv2d in module order outside the body and the `never` list."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and not matches(name, layout.body) and not matches(name, layout.never):
            return name
    raise SrquantError("Granular-DQ found no head conv (a Conv2d outside the layout's body and never list)")


def multibit_quantizers(model: nn.Module, controller: GranularityBitController) -> list[MultiBitLSQ]:
    """The body layers' multi-bit activation quantizers, in the controller's layer order."""
    return [model.get_submodule(name).input_quantizer for name in controller.layer_names]  # type: ignore[misc]


@dataclass
class Attachment:
    """The hooks that connect a controller to a model (remove with `detach`)."""

    handles: list[RemovableHandle]
    head: str

    def detach(self, model: nn.Module, controller: GranularityBitController) -> None:
        """Remove the hooks and clear every per-sample selection."""
        for handle in self.handles:
            handle.remove()
        for q in multibit_quantizers(model, controller):
            q.select(None)


def attach_controller(model: nn.Module, controller: GranularityBitController, head: str) -> Attachment:
    """Make every quantized forward pick per-sample bits from the head conv's output and the LR input."""
    targets = multibit_quantizers(model, controller)
    state: dict[str, torch.Tensor] = {}

    def remember_input(_module: nn.Module, args: tuple) -> None:
        state["lr"] = args[0]

    def set_bits(_module: nn.Module, _args: tuple, out: torch.Tensor) -> None:
        if out.device.type == "meta" or targets[0].mode is not QuantMode.QUANT:
            return  # op counting or the FP teacher: no bits, no Gumbel draws
        bits, gate, alternatives = controller(out, state["lr"])
        train = torch.is_grad_enabled() and gate.requires_grad
        for q in targets:
            q.select(bits, gate if train else None, alternatives if train else None)

    handles = [
        model.register_forward_pre_hook(remember_input),
        model.get_submodule(head).register_forward_hook(set_bits),
    ]
    return Attachment(handles, head)


class _ActStats:
    """Mean |x| and min of the inputs a layer sees during calibration."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.abs_sum = 0.0
        self.count = 0
        self.min = math.inf

    def collect(self, x: torch.Tensor) -> None:
        if not torch.isfinite(x).all():
            raise SrquantError(f"non-finite values (NaN/inf) reached quantizer {self.name} during calibration")
        self.abs_sum += float(x.abs().sum())
        self.count += x.numel()
        self.min = min(self.min, float(x.min()))


def quantize_granular(model: nn.Module, layout: QuantLayout, config: GranularDQConfig) -> tuple[QuantReport, list[str]]:
    """`quantize_` the body at W{w_bits} LSQ, then give each body conv a `MultiBitLSQ` input quantizer."""
    spec = QuantSpec(
        config.w_bits, max(config.candidate_bits), weight_quantizer="lsq", act_quantizer="lsq", matmul=False, full=False
    )
    report = quantize_(model, spec, layout)
    names = [name for name in report.layers if matches(name, layout.body)]
    if not names:
        raise SrquantError("Granular-DQ found no body layers: the layout's body matched nothing")
    for name in names:
        model.get_submodule(name).input_quantizer = MultiBitLSQ(config.candidate_bits)
    return report, names


@torch.no_grad()
def calibrate_granular(
    model: nn.Module,
    controller: GranularityBitController,
    batches: Sequence[torch.Tensor],
    config: GranularDQConfig,
) -> None:
    """Weight steps from max|W|; activation signedness and LSQ steps from the calibration inputs; E2B thresholds."""
    named = [(name, model.get_submodule(name)) for name in controller.layer_names]
    for _, module in named:
        wq = module.weight_quantizer
        qp = wq.qrange()[1]
        top = float(module.weight.detach().abs().max().clamp_min(1e-8))
        wq.step.fill_(top / qp if config.weight_init == "max" else 2 * top / math.sqrt(qp))
    stats = {name: _ActStats(name) for name, _ in named}
    for name, module in named:
        module.input_quantizer.calibrator = stats[name]
    model.eval()
    try:
        with mode_scope(model, QuantMode.CALIBRATE):
            for batch in batches:
                model(batch)
    finally:
        for _, module in named:
            module.input_quantizer.calibrator = None
    for name, module in named:
        s = stats[name]
        if s.count == 0:
            raise SrquantError(f"Granular-DQ body layer {name} saw no calibration data")
        module.input_quantizer.set_signed(s.min < -1e-5)
        module.input_quantizer.init_steps(s.abs_sum / s.count)
    controller.calibrate_thresholds(torch.cat([patch_entropy(b, controller.bins, controller.sigma) for b in batches]))
    set_mode(model, QuantMode.QUANT)
    for name, q in quantizers(model):  # layers outside the body that quantize_ may have converted stay FP
        if not any(name.startswith(f"{layer}.") for layer in controller.layer_names):
            q.mode = QuantMode.FP


# ---------------------------------------------------------------------------------------------- training


@dataclass
class GranularDQResult:
    """A model quantized and trained by Granular-DQ, its controller and what happened."""

    controller: GranularityBitController
    attachment: Attachment
    report: QuantReport
    layers: tuple[str, ...]
    head: str
    config: GranularDQConfig
    losses: list[float] = field(default_factory=list)
    mean_bits: list[float] = field(default_factory=list)
    thresholds: list[tuple[float, float]] = field(default_factory=list)
    rollbacks: list[str] = field(default_factory=list)
    stopped_early: bool = False
    calib_seconds: float = 0.0
    seconds: float = 0.0


def _split(batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(lr, hr) from what draw_batch returned: a tensor (LR only) or an (LR, HR-or-None) pair."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    return batch[0], batch[1]


def _task_loss(model: nn.Module, lr: torch.Tensor, hr: torch.Tensor | None, config: GranularDQConfig) -> torch.Tensor:
    """L1 to HR (QAT) or to the same network in FP (distillation)."""
    if config.loss == "distill":
        with torch.no_grad(), fp_mode(model):
            hr = model(lr)
    elif hr is None:
        raise SrquantError("Granular-DQ QAT needs HR crops: draw_batch must return (lr, hr)")
    return F.l1_loss(model(lr), hr)


def _trainable(model: nn.Module, controller: GranularityBitController, config: GranularDQConfig) -> list[nn.Parameter]:
    """Quantizer steps and the controller (not for a fixed bit); in QAT mode also every model weight."""
    steps = [p for _, q in quantizers(model) for p in q.parameters(recurse=False)]
    params = steps + (list(controller.parameters()) if controller.fixed_bits is None else [])
    if config.loss == "qat":
        seen = set(map(id, params))
        params += [p for p in model.parameters() if id(p) not in seen]
    return params


def run_granular_dq(
    model: nn.Module,
    layout: QuantLayout,
    draw_batch: Callable[[int], Batch],
    config: GranularDQConfig,
    progress: bool = False,
    draw_entropy_batch: Callable[[int], Batch] | None = None,
) -> GranularDQResult:
    """Quantize `model` in place, calibrate it and train it with Granular-DQ's patch-wise bits.

    `draw_batch(n)` returns n LR crops in [0, 1] and their HR crops (`(lr, hr)`, as `CropSampler.draw(n, rng,
    with_hr=True)`); in distillation mode an LR tensor alone is enough. The E2B thresholds come from the
    calibration crops, or from `draw_entropy_batch` when given (use test-sized patches, e.g. 96x96, so that the
    entropy distribution matches inference). The model is left in eval mode, quantized, with the controller
    attached and in eval mode (deterministic bits).
    """
    start = time.perf_counter()
    model.eval()
    head = head_conv_name(model, layout)
    report, names = quantize_granular(model, layout, config)
    channels = model.get_submodule(head).out_channels
    controller = GranularityBitController(names, channels, config)
    sizes = [min(config.calib_batch, config.calib_count - i) for i in range(0, config.calib_count, config.calib_batch)]
    calib = [_split(draw_batch(n))[0] for n in sizes]
    calibrate_granular(model, controller, calib, config)
    if draw_entropy_batch is not None:
        ent = [_split(draw_entropy_batch(n))[0] for n in sizes]
        controller.calibrate_thresholds(torch.cat([patch_entropy(b, controller.bins, controller.sigma) for b in ent]))
    attachment = attach_controller(model, controller, head)
    result = GranularDQResult(controller, attachment, report, tuple(names), head, config)
    result.thresholds.append(tuple(controller.thresholds.tolist()))  # type: ignore[arg-type]
    result.calib_seconds = time.perf_counter() - start
    _train(model, controller, draw_batch, config, result, progress)
    controller.eval()
    result.seconds = time.perf_counter() - start
    return result


def _train(
    model: nn.Module,
    controller: GranularityBitController,
    draw_batch: Callable[[int], Batch],
    config: GranularDQConfig,
    result: GranularDQResult,
    progress: bool,
) -> None:
    """Adam on steps, controller (and weights in QAT), ATC in the first epoch, with a divergence guard."""
    if config.iterations == 0:
        return
    trainable = _trainable(model, controller, config)
    frozen = [p for p in model.parameters() if not any(p is t for t in trainable)]
    saved_flags = [p.requires_grad for p in frozen]
    for p in frozen:
        p.requires_grad_(False)
    optimizer = torch.optim.Adam(trainable, lr=config.lr, betas=config.betas)
    generator = torch.Generator().manual_seed(config.seed)
    controller.reseed(config.seed)

    def snapshot() -> list[torch.Tensor]:
        return [p.detach().clone() for p in trainable] + [controller.thresholds.clone()]

    def restore(state: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, s in zip([*trainable, controller.thresholds], state, strict=True):
                p.copy_(s)

    # The guard's history starts from the calibrated model's own spread (deterministic bits), so a blow-up in
    # the very first steps is caught too.
    controller.eval()
    with torch.no_grad():
        seeds = [_split(draw_batch(config.batch_size)) for _ in range(config.guard_seed_batches)]
        recent = [v for v in (float(_task_loss(model, lr, hr, config)) for lr, hr in seeds) if math.isfinite(v)]
    good = snapshot()
    controller.train()
    bar = tqdm(total=config.iterations, desc="Granular-DQ", disable=not progress, leave=False)
    try:
        for step in range(config.iterations):
            bar.update(1)
            if step in config.lr_milestones:
                for group in optimizer.param_groups:
                    group["lr"] *= config.lr_gamma
            lr, hr = _split(draw_batch(config.batch_size))
            if config.augment:
                k = int(torch.randint(8, (1,), generator=generator))
                lr, hr = dihedral(lr, k), (dihedral(hr, k) if hr is not None else None)
            if step < config.epoch_iterations and controller.use_atc and controller.fixed_bits is None:
                controller.atc_update(patch_entropy(lr, controller.bins, controller.sigma))
            task = _task_loss(model, lr, hr, config)
            loss = task
            if config.bit_penalty and controller.fixed_bits is None and controller.last_expected_bits is not None:
                loss = loss + config.bit_penalty * controller.last_expected_bits.mean() / 8
            value, task_value = float(loss.detach()), float(task.detach())
            median = sorted(recent)[len(recent) // 2] if recent else math.inf
            if not math.isfinite(value) or (bool(recent) and task_value > config.blowup_factor * median):
                restore(good)
                for group in optimizer.param_groups:
                    group["lr"] *= 0.5
                optimizer.state.clear()
                result.rollbacks.append(
                    f"step {step}: loss {value:.4g} (median {median:.4g}); last good state restored, lr halved"
                )
                if len(result.rollbacks) >= config.max_rollbacks:
                    result.stopped_early = True
                    break
                continue
            good = snapshot()  # the state that just gave a sound loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            recent = (recent + [task_value])[-50:]
            result.losses.append(value)
            if controller.last_bits is not None:
                result.mean_bits.append(float(controller.last_bits.float().mean()))
            result.thresholds.append(tuple(controller.thresholds.tolist()))  # type: ignore[arg-type]
            bar.set_postfix(loss=f"{value:.4f}")
        if not result.stopped_early:  # the last update has not been checked by any loss yet
            with torch.no_grad():
                lr, hr = _split(draw_batch(config.batch_size))
                final = float(_task_loss(model, lr, hr, config))
            median = sorted(recent)[len(recent) // 2] if recent else math.inf
            if not math.isfinite(final) or (bool(recent) and final > config.blowup_factor * median):
                restore(good)
                result.rollbacks.append(f"final check: loss {final:.4g} (median {median:.4g}); last good restored")
    finally:
        bar.close()
        controller.eval()
        for p, flag in zip(frozen, saved_flags, strict=True):
            p.requires_grad_(flag)
        for q in multibit_quantizers(model, controller):
            q.select(None)


# ------------------------------------------------------------------------------------- patch-wise inference


class PatchBit(NamedTuple):
    """One LR patch (top, left, height, width) and the activation bit it ran at."""

    top: int
    left: int
    height: int
    width: int
    bit: int


def _starts(length: int, patch: int, step: int) -> list[int]:
    """Patch origins along one axis: every `step`, the last one flush with the border."""
    if length <= patch:
        return [0]
    starts = list(range(0, length - patch + 1, step))
    if starts[-1] != length - patch:
        starts.append(length - patch)
    return starts


def patch_boxes(height: int, width: int, patch: int = 96, step: int = 90) -> list[tuple[int, int, int, int]]:
    """(top, left, h, w) of the overlapping patches that tile an LR image, row-major."""
    if patch < 1 or not 1 <= step <= patch:
        raise SrquantError(f"patch-wise inference needs patch >= 1 and 1 <= step <= patch, got {patch}, {step}")
    return [
        (t, left, min(patch, height), min(patch, width))
        for t in _starts(height, patch, step)
        for left in _starts(width, patch, step)
    ]


@torch.no_grad()
def upscale_patchwise(
    model: nn.Module,
    controller: GranularityBitController | None,
    lr_image: torch.Tensor,
    patch: int = 96,
    step: int = 90,
    batch: int = 8,
) -> tuple[torch.Tensor, list[PatchBit]]:
    """Super-resolve an LR image (3xHxW or 1x3xHxW) patch by patch, each at its own bit; overlaps are averaged.

    The controller must be attached to the model (`attach_controller`); with None (or quantization off) every
    patch is reported at 32 bits. Returns the SR image (same rank as the input) and the per-patch bits.
    """
    squeeze = lr_image.dim() == 3
    x = lr_image.unsqueeze(0) if squeeze else lr_image
    if x.dim() != 4 or x.shape[0] != 1:
        raise SrquantError(f"upscale_patchwise takes one image (3xHxW or 1x3xHxW), got {tuple(lr_image.shape)}")
    if controller is not None:
        controller.eval()
    height, width = x.shape[-2:]
    boxes = patch_boxes(height, width, patch, step)
    out = weight = None
    scale = 0
    bits: list[PatchBit] = []
    for i in range(0, len(boxes), batch):
        group = boxes[i : i + batch]
        crops = torch.cat([x[..., t : t + h, c : c + w] for t, c, h, w in group])
        if controller is not None:
            controller.last_bits = None
        sr = model(crops)
        chosen = controller.last_bits.tolist() if controller is not None and controller.last_bits is not None else None
        if out is None:
            scale = sr.shape[-1] // group[0][3]
            out = x.new_zeros(1, sr.shape[1], height * scale, width * scale)
            weight = x.new_zeros(1, 1, height * scale, width * scale)
        assert weight is not None
        for k, (t, c, h, w) in enumerate(group):
            out[..., t * scale : (t + h) * scale, c * scale : (c + w) * scale] += sr[k : k + 1]
            weight[..., t * scale : (t + h) * scale, c * scale : (c + w) * scale] += 1
            bits.append(PatchBit(t, c, h, w, int(chosen[k]) if chosen is not None else 32))
    assert out is not None and weight is not None
    sr_image = out / weight
    return (sr_image[0] if squeeze else sr_image), bits


@dataclass
class ImageBitReport:
    """Per-image bit usage: each patch's bit, FAB, per-patch BitOPs and the image-level BitOPs."""

    patch_bits: list[PatchBit]
    fab: float
    patch_bitops: list[float]
    bitops: float  # pixel-weighted mean over patches (MACs-based BitOPs)
    bitops_total: float  # sum over patches: what the overlapping patches cost together

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly form."""
        return {
            "patch_bits": [p._asdict() for p in self.patch_bits],
            "fab": self.fab,
            "patch_bitops": self.patch_bitops,
            "bitops": self.bitops,
            "bitops_total": self.bitops_total,
        }


def image_bit_report(
    model: nn.Module,
    layers: Sequence[str],
    patch_bits: Sequence[PatchBit],
    scale: int,
    w_bits: int = 8,
    body_only: bool = False,
) -> ImageBitReport:
    """FAB = mean patch bit; per patch BitOPs with every body layer at (w_bits, patch bit), others at 32/32.

    With `body_only` the BitOPs count only the body layers' rows.
    """
    if not patch_bits:
        raise SrquantError("image_bit_report needs at least one patch")
    reports: dict[tuple[int, int], OpsReport] = {}
    per_patch = []
    for p in patch_bits:
        size = (p.height, p.width)
        if size not in reports:
            rep = ops_report(model, scale, size)
            if body_only:
                rep = OpsReport(rep.lr_size, rep.out_size, tuple(r for r in rep.rows if r.name in set(layers)))
            reports[size] = rep
        per_patch.append(bitops(reports[size], {name: (w_bits, min(p.bit, 32)) for name in layers}))
    pixels = [p.height * p.width for p in patch_bits]
    fab = sum(p.bit for p in patch_bits) / len(patch_bits)
    weighted = sum(b * n for b, n in zip(per_patch, pixels, strict=True)) / sum(pixels)
    return ImageBitReport(list(patch_bits), fab, per_patch, weighted, float(sum(per_patch)))


def bit_map(lr_image: torch.Tensor | np.ndarray, patch_bits: Sequence[PatchBit], alpha: float = 0.45) -> np.ndarray:
    """An HxWx3 uint8 image: each patch tinted by its bit's fixed colour, blended over the LR image."""
    if isinstance(lr_image, torch.Tensor):
        img = lr_image.detach().float().cpu()
        img = img[0] if img.dim() == 4 else img
        base = (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).astype(np.float32)
    else:
        base = np.asarray(lr_image, dtype=np.float32)
    if base.ndim != 3 or base.shape[2] != 3:
        raise SrquantError(f"bit_map needs an RGB image, got shape {base.shape}")
    tint = base.copy()
    for p in patch_bits:  # later patches win on overlaps
        colour = np.array(PALETTE.get(p.bit, (128, 128, 128)), dtype=np.float32)
        tint[p.top : p.top + p.height, p.left : p.left + p.width] = colour
    return np.clip((1 - alpha) * base + alpha * tint, 0, 255).round().astype(np.uint8)
