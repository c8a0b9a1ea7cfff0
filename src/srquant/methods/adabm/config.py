"""AdaBM's configuration: the schedule and hyper-parameters, with the paper's run.sh and a CPU-sized preset."""

from __future__ import annotations

from dataclasses import dataclass

from srquant.errors import SrquantError

ALLOCATIONS = ("paper", "measured")


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
    allocation: str = "paper"  # "paper": std and complexity measures; "measured": +-1-bit output errors (srquant)
    layer_range: int = 1  # b_layer in [-layer_range, layer_range]: the paper's 1; srquant's presets 2 (measured)
    reclip: bool = True  # measured allocation: a moved layer's range is clipped for its new bit (MSE search)
    sensitivity_crops: int | None = None  # crops the measured allocation scores on (and as many to check on);
    # None: half the calibration crops, at most 16
    augment: bool = True
    seed: int = 0
    blowup_factor: float = 4.0
    max_rollbacks: int = 5
    guard_seed_batches: int = 8

    @property
    def scoring_crops(self) -> int:
        """Calibration crops the measured allocation scores on: the configured count, else half of them (<= 16)."""
        if self.sensitivity_crops is not None:
            return self.sensitivity_crops
        return max(1, min(16, self.calib_count // 2))

    def __post_init__(self) -> None:
        if self.allocation not in ALLOCATIONS:
            raise SrquantError(f"AdaBM allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")
        if not isinstance(self.layer_range, int) or not 1 <= self.layer_range <= 3:
            raise SrquantError(f"AdaBM layer_range must be 1, 2 or 3, got {self.layer_range!r}")
        if self.sensitivity_crops is not None and self.sensitivity_crops < 1:
            raise SrquantError(f"AdaBM sensitivity_crops must be positive, got {self.sensitivity_crops}")
        if self.allocation == "measured" and 2 * self.scoring_crops > self.calib_count:
            raise SrquantError(
                f"AdaBM's measured allocation scores on sensitivity_crops and checks on as many held-out ones: "
                f"calib_count {self.calib_count} < 2 x {self.scoring_crops}"
            )
        for name in ("bit_aware_clipping", "image2bit", "layer2bit", "augment", "reclip"):
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
    # srquant's CPU schedule (IMDN x4 within a few minutes): 64 calibration crops in 4 batches, so the thresholds'
    # EMA sees several batches as in the original; bits allocated from measured output errors, layer bits moved by
    # up to 2, no image bit: it moves FAB off the base on test images (IMDN x4 W8A6: Set5 FAB 5.80 with it;
    # docs/quantization.md, AdaBM).
    "cpu": AdaBMConfig(
        epochs=6,
        iterations=10,
        batch_size=2,
        crop=40,
        calib_count=64,
        calib_batch=16,
        allocation="measured",
        layer_range=2,
        image2bit=False,
    ),
    # srquant's GPU schedule: run.sh's, with the measured allocation as in `cpu`.
    "gpu": AdaBMConfig(allocation="measured", layer_range=2, image2bit=False),
}
ADABM_PRESETS["code"] = ADABM_PRESETS["paper"]  # the paper's tables were not found: run.sh is both
