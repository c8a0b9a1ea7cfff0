"""AdaBM's bit state and how a model runs with it: Image2Bit, Layer2Bit, and the adaptive-bit model wrapper.

Every adaptive layer k quantizes its input, for image x, at
    a_k(x) = base + b_img(x) + b_layer(k),   b_img in {-1, 0, +1},   b_layer in {-R, ..., +R},
where R (`layer_range`) is 1 in the paper and 2 in srquant's presets, with the hard value used forward and a tanh
surrogate backward (`soft - soft.detach() + hard.detach()`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from srquant.errors import SrquantError
from srquant.methods.controls import check_histogram, content_uniform, draw_from_histogram
from srquant.methods.training import grayscale
from srquant.metrics.complexity import GIGA, OpsReport, bitops
from srquant.quant.accounting import layer_bits, ops_report
from srquant.quant.quantizers import Quantizer, straight_through


def image_complexity(x: torch.Tensor) -> torch.Tensor:
    """Image2Bit's complexity per sample: 1000 * mean |first-order gradient| of the grayscale image in [0, 1].

    Operator (kornia.spatial_gradient's default, re-written here): grayscale = 0.299 R + 0.587 G + 0.114 B,
    replicate padding by 1, normalised Sobel kernels [[-1,0,1],[-2,0,2],[-1,0,1]] / 8 and its transpose; the
    mean of |gx| and |gy| over both directions and all pixels.
    """
    gray = grayscale(x)
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=x.dtype, device=x.device) / 8
    kernels = torch.stack([kx, kx.t()]).unsqueeze(1)  # (2, 1, 3, 3)
    grad = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), kernels)
    return 1000.0 * grad.abs().flatten(1).mean(dim=1)


class BitController(nn.Module):
    """AdaBM's learnable bit state: Image2Bit thresholds (measure_l, measure_u) and Layer2Bit measures.

    Its state_dict holds the thresholds, the measures, the calibrated sensitivities and (extra state) the layer
    names, base bits and ablation switches: `image2bit=False` makes b_img 0, `layer2bit=False` makes b_layer 0.
    """

    def __init__(
        self,
        layer_names: Sequence[str],
        base_bits: int,
        image2bit: bool = True,
        layer2bit: bool = True,
        layer_range: int = 1,
    ) -> None:
        super().__init__()
        self.layer_names = tuple(layer_names)
        self.base_bits = int(base_bits)
        self.layer_range = int(layer_range)  # b_layer in [-layer_range, layer_range]; the paper's is 1
        self.image2bit = bool(image2bit)
        self.layer2bit = bool(layer2bit)
        self.measure_l = nn.Parameter(torch.tensor(0.0))
        self.measure_u = nn.Parameter(torch.tensor(1.0))
        self.measure_layer = nn.Parameter(torch.zeros(len(self.layer_names)))
        self.register_buffer("sensitivity", torch.zeros(len(self.layer_names)))
        # +1: complex images get more bits (the paper); -1: fewer; 0: no image bit (the measured allocation's
        # verdict when neither direction pays on the calibration crops).
        self.register_buffer("image_direction", torch.tensor(1.0))
        self.random_image_shares: dict[int, float] | None = None  # set on a random control (`randomized`)
        self.random_seed = 0

    def get_extra_state(self) -> dict[str, object]:
        """Layer names, base bits and switches travel with the state: a reload gives the same bits or fails."""
        return {
            "layer_names": list(self.layer_names),
            "base_bits": self.base_bits,
            "image2bit": self.image2bit,
            "layer2bit": self.layer2bit,
            "layer_range": self.layer_range,
        }

    def set_extra_state(self, state: dict[str, object]) -> None:
        """Refuse a state saved for other layers or another base bit-width; take its switches."""
        names, base = tuple(state["layer_names"]), int(state["base_bits"])  # type: ignore[arg-type,call-overload]
        if names != self.layer_names or base != self.base_bits:
            raise SrquantError("AdaBM bit state was saved for other layers or another base bit-width")
        self.image2bit = bool(state["image2bit"])
        self.layer2bit = bool(state["layer2bit"])
        self.layer_range = int(state.get("layer_range", 1))  # type: ignore[call-overload]

    @classmethod
    def from_state(cls, state: dict[str, object]) -> BitController:
        """A controller rebuilt from its state_dict (extra state included)."""
        extra = state["_extra_state"]
        controller = cls(extra["layer_names"], int(extra["base_bits"]))  # type: ignore[index,call-overload]
        controller.load_state_dict(state, strict=True)
        return controller

    @property
    def image_active(self) -> bool:
        """Image2Bit is on and has a direction: images can get their own bit."""
        return self.image2bit and float(self.image_direction) != 0

    def trainable(self) -> list[nn.Parameter]:
        """The bit parameters that can change the bits: thresholds with Image2Bit active, measures with Layer2Bit."""
        params = [self.measure_l, self.measure_u] if self.image_active else []
        return params + [self.measure_layer] if self.layer2bit else params

    def image_bits(self, x: torch.Tensor) -> torch.Tensor:
        """b_img per sample in {-1, 0, +1}, times the direction; surrogate tanh((c - (u+l)/2) * 2 / (u-l))
        backward (0 when off)."""
        if self.random_image_shares is not None:
            u = content_uniform(x, self.random_seed)
            return draw_from_histogram(u, self.random_image_shares).to(device=x.device, dtype=x.dtype)
        if not self.image_active:
            return x.new_zeros(x.shape[0])
        c = image_complexity(x)
        lower, upper = self.measure_l, self.measure_u
        hard = (c > upper).float() - (c < lower).float()
        soft = torch.tanh((c - (upper + lower) / 2) * 2 / (upper - lower).abs().clamp_min(1e-6))
        return self.image_direction * straight_through(soft, hard)

    def randomized(self, image_shares: Mapping[int, float], seed: int = 0) -> BitController:
        """The random control: this controller's layer offsets in a seeded random order, and for each image an
        offset drawn with `image_shares` ({-1: p, 0: q, 1: r}, e.g. what this controller gave a dataset) from a hash
        of its content. Same bit histogram, no content-driven choice; deterministic."""
        control = copy.deepcopy(self)
        offsets = self.layer_bits().detach()
        order = torch.randperm(len(offsets), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            control.measure_layer.copy_(offsets[order.to(offsets.device)])  # integer values: exact offsets
        control.random_image_shares = check_histogram(image_shares)
        control.random_seed = seed
        return control

    def layer_bits(self) -> torch.Tensor:
        """b_layer per adaptive layer: round(clamp(m, -R, R)) forward, R tanh(m / R) backward, R = layer_range
        (the paper's R = 1: round(clamp(m, -1, 1)) and tanh(m)); 0 when off."""
        m, r = self.measure_layer, float(self.layer_range)
        if not self.layer2bit:
            return m.detach().new_zeros(m.shape)
        return straight_through(r * torch.tanh(m / r), torch.round(m.clamp(-r, r)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Activation bits (B, n_layers) for a batch: base + b_img + b_layer."""
        return self.base_bits + self.image_bits(x)[:, None] + self.layer_bits()[None, :]


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


class AdaptiveBitsModel(nn.Module):
    """A quantized network run with AdaBM's per-image, per-layer activation bits.

    Every forward sets each adaptive layer's per-sample bits from the LR input, then runs the network. It also
    measures what an image cost (`image_metrics`: FAB and BitOPs at the bits it got) and records its bits
    (`image_record`), which `srquant eval` reports.
    """

    def __init__(self, network: nn.Module, controller: BitController) -> None:
        super().__init__()
        self.network = network
        self.controller = controller
        self.scale = int(network.scale)
        self.pad_multiple = int(getattr(network, "pad_multiple", 1))
        self.last_bits: torch.Tensor | None = None
        self._ops: OpsReport | None = None
        self.train(network.training)  # a wrapper of an eval-mode network is in eval mode too

    def use_controller(self, controller: BitController) -> None:
        """Run with another controller (e.g. `controller.randomized(...)`, the random control) from now on."""
        if controller.layer_names != self.controller.layer_names:
            raise SrquantError("the new AdaBM controller was fitted for other layers")
        self.controller = controller

    def adaptive_quantizers(self) -> list[Quantizer]:
        """The input quantizers of the adaptive layers, in the controller's order."""
        return [self.network.get_submodule(name).input_quantizer for name in self.controller.layer_names]  # type: ignore[misc]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bits = self.controller(x)
        self.last_bits = bits
        for k, quantizer in enumerate(self.adaptive_quantizers()):
            quantizer.bits_override = bits[:, k]
        try:
            return self.network(x)
        finally:
            for quantizer in self.adaptive_quantizers():
                quantizer.bits_override = None

    def layer_bits_for(self, image: torch.Tensor) -> dict[str, tuple[int, int]]:
        """`layer -> (w_bits, a_bits)` with the adaptive layers at this image's bits (for BitOPs)."""
        if image.dim() == 3:
            image = image.unsqueeze(0)
        if image.shape[0] != 1:
            raise SrquantError("BitOPs differ per image: give one image")
        bits = layer_bits(self.network)
        for name, per_sample in bit_report(self.controller, image).per_layer.items():
            if name in bits:
                bits[name] = (bits[name][0], per_sample[0])
        return bits

    def image_metrics(self, lr: torch.Tensor) -> dict[str, float]:
        """FAB and BitOPs (G, for a 1280x720 output) of one LR image at the bits it gets."""
        if self._ops is None:
            self._ops = ops_report(self.network, self.scale)
        return {
            "fab": bit_report(self.controller, lr).fab,
            "bitops_g": bitops(self._ops, self.layer_bits_for(lr)) / GIGA,
        }

    def image_record(self, lr: torch.Tensor) -> dict[str, object]:
        """The bits one LR image gets: FAB and each adaptive layer's bit."""
        used = bit_report(self.controller, lr)
        return {"fab": used.fab, "layers": {k: v[0] for k, v in used.per_layer.items()}}
