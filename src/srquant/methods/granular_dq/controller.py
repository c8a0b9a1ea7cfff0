"""GBC + E2B + ATC: the controller that picks one activation bit per LR patch, and how it is wired to a network."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from srquant.errors import SrquantError
from srquant.methods.controls import check_histogram, content_uniform, draw_from_histogram
from srquant.methods.granular_dq.config import GranularDQConfig
from srquant.methods.granular_dq.entropy import patch_entropy
from srquant.models.layout import QuantLayout
from srquant.quant.quantizers import MultiBitLSQ, QuantMode, straight_through
from srquant.quant.spec import matches


class GranularityBitController(nn.Module):
    """GBC + E2B + ATC: per-patch bits from the head-conv features and the LR patch's entropy.

    Training mode samples a hard Gumbel-softmax (seeded `generator`) with a straight-through gradient; eval
    mode (or `stochastic=False`) takes the argmax, so test-time bits never depend on random numbers.
    """

    def __init__(self, layer_names: Sequence[str], channels: int, config: GranularDQConfig) -> None:
        super().__init__()
        self.layer_names = tuple(layer_names)
        # Measured allocation: one code per candidate bit, whose output is the patch's predicted error at it.
        self.measured = config.allocation == "measured"
        self.gbc_bits = tuple(sorted(config.act_bits)) if self.measured else tuple(config.gbc_bits)
        self.e2b_bits = tuple(config.e2b_bits)
        self.grids = tuple(config.grids)
        self.tau = config.tau
        self.bins, self.sigma = config.entropy_bins, config.entropy_sigma
        self.quantiles = tuple(config.e2b_quantiles)
        self.atc_gamma = config.atc_gamma
        self.use_e2b, self.use_atc = config.e2b and not self.measured, config.atc and not self.measured
        self.fixed_bits = config.fixed_bits
        # At least 2 channels per group, so the 1x1 granularity (and a batch of one patch) is normalisable.
        groups = max([d for d in range(1, config.gn_groups + 1) if channels % d == 0 and channels // d >= 2] or [1])
        self.norms = nn.ModuleList(nn.GroupNorm(groups, channels) for _ in self.grids)
        self.channels = channels
        # Measured allocation reads each channel's log energy and log gradient energy (2 per channel): quantization
        # error grows with activation magnitude and texture, which GroupNorm takes out of the paper's features.
        features = 2 * channels if self.measured else channels * sum(g * g for g in self.grids)
        self.fc = nn.Linear(features, len(self.gbc_bits))
        init = torch.Generator().manual_seed(config.seed)
        bound = 1 / math.sqrt(self.fc.in_features)
        with torch.no_grad():
            self.fc.weight.uniform_(-bound, bound, generator=init)
            self.fc.bias.uniform_(-bound, bound, generator=init)
        self.register_buffer("thresholds", torch.tensor([0.0, math.inf]))
        self.register_buffer("atc_updates", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("bit_price", torch.tensor(0.0))  # set by `calibrate_bit_price` for a bit budget
        self.generator = torch.Generator().manual_seed(config.seed)
        self.stochastic: bool | None = None
        self.last_bits: torch.Tensor | None = None
        self.last_gbc_bits: torch.Tensor | None = None
        self.last_expected_bits: torch.Tensor | None = None
        self.random_shares: dict[int, float] | None = None  # set on a random control (`randomized`)
        self.random_seed = 0

    def get_extra_state(self) -> dict[str, object]:
        """Layer names, bit codes and switches travel with the state: a reload gives the same bits or fails."""
        return {
            "layer_names": list(self.layer_names),
            "gbc_bits": list(self.gbc_bits),
            "e2b": list(self.e2b_bits),
            "use_e2b": self.use_e2b,
            "use_atc": self.use_atc,
            "fixed_bits": self.fixed_bits,
            "measured": self.measured,
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
        self.measured = bool(state.get("measured", False))

    def randomized(self, shares: Mapping[int, float], seed: int = 0) -> GranularityBitController:
        """The random control: each patch's bit drawn with `shares` ({bit: share}, e.g. what this controller gave
        a dataset) from a hash of the patch's content; same histogram, no content-driven choice; deterministic."""
        bad = sorted(set(shares) - set(self.gbc_bits) - set(self.e2b_bits))
        if bad:
            raise SrquantError(f"random control bits {bad} are not among this controller's bits")
        control = copy.deepcopy(self)
        control.random_shares = check_histogram(shares)
        control.random_seed = seed
        return control.eval()

    def reseed(self, seed: int) -> None:
        """Restart the Gumbel noise sequence."""
        self.generator.manual_seed(seed)

    def granularity_features(self, feat: torch.Tensor) -> list[torch.Tensor]:
        """Per granularity g: the feature average-pooled to a g x g grid, GroupNormed, flattened (B, C*g*g)."""
        return [norm(F.adaptive_avg_pool2d(feat, g)).flatten(1) for g, norm in zip(self.grids, self.norms, strict=True)]

    @staticmethod
    def magnitude_features(feat: torch.Tensor) -> torch.Tensor:
        """Per channel, the log mean square of the features and of their differences to the right and below
        neighbours (B, 2C): how large and how textured each channel's activations are."""
        energy = feat.pow(2).mean(dim=(2, 3))
        dx = (feat[..., :, 1:] - feat[..., :, :-1]).pow(2).mean(dim=(2, 3)) if feat.shape[-1] > 1 else energy * 0
        dy = (feat[..., 1:, :] - feat[..., :-1, :]).pow(2).mean(dim=(2, 3)) if feat.shape[-2] > 1 else energy * 0
        return torch.cat([energy.clamp_min(1e-12).log(), ((dx + dy) / 2).clamp_min(1e-12).log()], dim=1)

    def controller_features(self, feat: torch.Tensor) -> torch.Tensor:
        """What the linear layer reads: the granularity features (paper) or the magnitude features (measured)."""
        return self.magnitude_features(feat) if self.measured else torch.cat(self.granularity_features(feat), dim=1)

    def logits(self, feat: torch.Tensor) -> torch.Tensor:
        """GBC logits over `gbc_bits` from the head-conv features; measured allocation: minus the predicted
        output error at each bit (its linear layer predicts the log of that error)."""
        raw = self.fc(self.controller_features(feat))
        return -torch.exp(raw.clamp(max=30.0)) if self.measured else raw

    @torch.no_grad()
    def fit_distortion(self, feat: torch.Tensor, errors: torch.Tensor, held_out: float = 0.25) -> float:
        """Fit the linear layer by ridge regression to log(errors) (N, len(gbc_bits)) from the head features
        `feat`; the ridge strength is the one that predicts a held-out share of the patches best. Returns the
        held-out mean squared error of the predicted log errors at that strength."""
        if errors.shape != (feat.shape[0], len(self.gbc_bits)):
            raise SrquantError(f"distortion fit needs errors of shape (N, {len(self.gbc_bits)}), got {errors.shape}")
        x = self.controller_features(feat).double().cpu()
        y = errors.double().clamp_min(1e-12).log().cpu()
        n_fit = max(2, int(round(x.shape[0] * (1 - held_out))))

        def solve(xs: torch.Tensor, ys: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
            mean_x, mean_y = xs.mean(0), ys.mean(0)
            xc = xs - mean_x
            gram = xc.T @ xc + alpha * torch.eye(xs.shape[1], dtype=xs.dtype)
            weight = torch.linalg.solve(gram, xc.T @ (ys - mean_y))
            return weight, mean_y - mean_x @ weight

        scale = float((x[:n_fit] - x[:n_fit].mean(0)).pow(2).sum()) / x.shape[1] + 1e-12
        scores = {}
        for alpha in (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0):
            weight, bias = solve(x[:n_fit], y[:n_fit], alpha * scale)
            scores[alpha] = float((x[n_fit:] @ weight + bias - y[n_fit:]).pow(2).mean())
        alpha = min(scores, key=scores.__getitem__)
        weight, bias = solve(x, y, alpha * scale)
        self.fc.weight.copy_(weight.T.to(self.fc.weight))
        self.fc.bias.copy_(bias.to(self.fc.bias))
        return scores[alpha]

    def is_stochastic(self) -> bool:
        """Gumbel sampling in training mode unless overridden by `stochastic`."""
        return self.training if self.stochastic is None else self.stochastic

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """Straight-through one-hot (B, n): hard Gumbel-softmax sample in training, argmax in eval."""
        if self.is_stochastic():
            u = torch.rand(logits.shape, generator=self.generator).to(logits.device).clamp(1e-10, 1 - 1e-10)
            soft = F.softmax((logits - torch.log(-torch.log(u))) / self.tau, dim=-1)
            hard = F.one_hot(soft.argmax(dim=-1), len(self.gbc_bits)).to(soft.dtype)
        else:  # argmax of the logits themselves: softmax keeps the order but can round close logits to ties
            soft = F.softmax(logits / self.tau, dim=-1)
            hard = F.one_hot(logits.argmax(dim=-1), len(self.gbc_bits)).to(soft.dtype)
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
        q = torch.quantile(entropies.float(), torch.tensor(self.quantiles, device=entropies.device))
        self.thresholds.copy_(q)

    @torch.no_grad()
    def calibrate_bit_price(self, feat: torch.Tensor, lr: torch.Tensor, target_fab: float) -> float:
        """The smallest price per bit at which the deterministic bits of these patches average at most
        `target_fab` (bisection; FAB falls as the price rises); sets and returns it."""
        was_training = self.training
        self.eval()

        def fab(price: float) -> float:
            self.bit_price.fill_(price)
            return float(self(feat, lr)[0].double().mean())

        low, high = 0.0, 1.0
        if fab(low) > target_fab:
            while fab(high) > target_fab and high < 1e6:
                high *= 2
            for _ in range(40):
                middle = (low + high) / 2
                low, high = (middle, high) if fab(middle) > target_fab else (low, middle)
        else:
            high = 0.0
        self.bit_price.fill_(high)
        self.train(was_training)
        return high

    @torch.no_grad()
    def atc_update(self, entropies: torch.Tensor) -> None:
        """ATC: one EMA step of each threshold towards the batch entropy quantile at the same probability."""
        q = torch.quantile(entropies.float(), torch.tensor(self.quantiles, device=entropies.device))
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
        if self.random_shares is not None:  # random control: the bits by chance, in the given proportions
            u = content_uniform(lr, self.random_seed)
            bits = draw_from_histogram(u, self.random_shares).to(feat.device)
            self.last_gbc_bits, self.last_bits, self.last_expected_bits = bits, bits, bits.float()
            return bits, torch.ones(bits.shape[0], 1, device=feat.device), bits[:, None]
        logits = self.logits(feat)
        codes = torch.tensor(self.gbc_bits, dtype=logits.dtype, device=logits.device)
        alternatives = codes.to(torch.int64).expand(logits.shape[0], -1).clone()
        top_code = len(self.gbc_bits) - 1 - list(reversed(self.gbc_bits)).index(max(self.gbc_bits))
        if self.use_e2b:
            alternatives[:, top_code] = self.e2b(patch_entropy(lr, self.bins, self.sigma).to(feat.device))
        # srquant's bit price (0 unless a bit budget was calibrated): each code's logit pays for the bit it runs.
        onehot = self.choose(logits - self.bit_price * alternatives.to(logits.dtype))
        index = onehot.detach().argmax(dim=-1)
        gbc = codes.to(torch.int64)[index]
        bits = alternatives.gather(1, index[:, None]).squeeze(1)
        self.last_gbc_bits, self.last_bits = gbc, bits
        # The bit each patch runs at (E2B's for the top code): hard value, soft-probability gradient.
        self.last_expected_bits = (onehot * alternatives.to(onehot.dtype)).sum(dim=-1)
        return bits, onehot, alternatives


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
