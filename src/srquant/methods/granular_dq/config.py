"""Granular-DQ's configuration: schedule, bit sets, E2B and ATC settings; the paper's run and a CPU-sized one."""

from __future__ import annotations

from dataclasses import dataclass

from srquant.errors import SrquantError


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
    target_fab: float | None = None  # srquant's bit budget: a price per bit calibrated after training to meet it
    budget_weight: float = 0.0  # optional training term: this weight x the batch's mean bit above target_fab
    price_lr: float = 0.05  # with target_fab: the bit price's step per bit of excess per training batch
    controller_lr: float | None = None  # the controller's own Adam rate (None: lr)
    # "paper": GBC learns its logits through the L1 loss; "measured" (srquant): the network trains on random patch
    # bits whose mean is target_fab, GBC's linear layer is fitted to each patch's measured output error at every
    # bit from magnitude features, the bit price meets target_fab, and the rest of the schedule trains on those
    # bits (E2B and ATC do not apply).
    allocation: str = "paper"
    distortion_count: int = 96  # measured allocation: test-sized patches whose per-bit errors GBC is fitted to
    allocation_warmup: float = 0.5  # measured allocation: share of the iterations on random bits before the fit
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
        if self.target_fab is not None and not min(self.act_bits) <= self.target_fab <= max(self.act_bits):
            raise SrquantError(
                f"Granular-DQ target_fab must lie within act_bits [{min(self.act_bits)}, {max(self.act_bits)}], "
                f"got {self.target_fab}"
            )
        bad_lr = self.controller_lr is not None and not self.controller_lr > 0
        if self.price_lr < 0 or self.budget_weight < 0 or bad_lr:
            raise SrquantError("Granular-DQ needs price_lr >= 0, budget_weight >= 0 and a positive controller_lr")
        if self.allocation not in ("paper", "measured"):
            raise SrquantError(f"Granular-DQ allocation must be 'paper' or 'measured', got {self.allocation!r}")
        if self.allocation == "measured" and self.fixed_bits is None and self.target_fab is None:
            raise SrquantError("Granular-DQ's measured allocation needs a bit budget: set target_fab (--target-fab)")
        if not 0 < self.allocation_warmup <= 1:
            raise SrquantError(f"Granular-DQ allocation_warmup must be in (0, 1], got {self.allocation_warmup}")
        if self.distortion_count < 8:
            raise SrquantError(f"Granular-DQ distortion_count must be at least 8, got {self.distortion_count}")
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
