"""The model zoo: an explicit table of architectures, their pretrained checkpoints and the numbers they give.

`create_model(name, scale)` builds an architecture and loads its checkpoint strictly from the asset
directory (sha256-verified; downloaded into the cache on request). Every checkpoint load goes through
`load_state_strict`, which names the missing, unexpected and mis-shaped keys when a file does not fit.
"""

from __future__ import annotations

import logging
import pickle
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from srquant.assets import asset_dir, download, user_cache_dir, verify_sha256
from srquant.errors import SrquantError
from srquant.models import carn, edsr, eswt, imdn, lmlt, pan, rdn, srresnet, swinir, user
from srquant.models.layout import PER_CHANNEL, QuantLayout
from srquant.models.user import ARCH_ATTRIBUTE

Reference = Mapping[str, tuple[float, float]]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Checkpoint:
    """One released weight file and the FP numbers it reproduces (BasicSR convention, whole images)."""

    filename: str
    url: str | None
    sha256: str | None
    state_key: str | None = None
    reference: Reference = field(default_factory=dict)


@dataclass(frozen=True)
class ModelEntry:
    """An architecture in the zoo: how to build it, its tiny test variant and its checkpoints per scale."""

    name: str
    kind: str
    builder: Callable[..., nn.Module]
    scales: tuple[int, ...]
    kwargs: Mapping[str, Any]
    tiny_kwargs: Mapping[str, Any]
    checkpoints: Mapping[int, Checkpoint]
    paper: str
    source: str
    layout: QuantLayout
    license: str = "unknown"
    note: str = ""

    def checkpoint(self, scale: int) -> Checkpoint | None:
        """The released checkpoint for this scale, or None when none is registered."""
        return self.checkpoints.get(scale)


def _gh(repo: str, ref: str, path: str) -> str:
    return f"https://github.com/{repo}/raw/{ref}/{path}"


_IMDN_REF = {
    2: {"Set5": (38.00, 0.9605), "Set14": (33.63, 0.9177)},
    3: {"Set5": (34.36, 0.9270), "Set14": (30.32, 0.8417)},
    4: {
        "Set5": (32.21, 0.8948),
        "Set14": (28.58, 0.7811),
        "B100": (27.56, 0.7353),
        "Urban100": (26.04, 0.7838),
    },
}
_IMDN_SHA = {
    2: "740b39653592bd3f49955a21cd9e16f2d37f2c413368cc09327601b8fbe42ce1",
    3: "11b1716a19bc16e5e353e1db798d476169338e631eb170c82d765559888cb028",
    4: "e660c38221147217a136debeb99eb304d62d9c0f73ac421ed66281b619719714",
}
_PAN_REF = {
    2: {"Set5": (38.00, 0.9605), "Set14": (33.59, 0.9181)},
    3: {"Set5": (34.40, 0.9272), "Set14": (30.36, 0.8422)},
    4: {
        "Set5": (32.13, 0.8948),
        "Set14": (28.61, 0.7822),
        "B100": (27.59, 0.7363),
        "Urban100": (26.11, 0.7854),
    },
}
_PAN_SHA = {
    2: "fcf8ed48656abbaae46309ee91745684b80235a9c8b37a2d8fb0715a3ad3f00f",
    3: "86491751d73645a8816a0d6ec62ccde6b22ce5da930e36b3b87f5437167fbc89",
    4: "739fab99ee7b7058dab4d1b84aa2869bb9fc3995a1c08789c20355bee943833c",
}
_CARN_REF = {
    2: {"Set5": (37.68, 0.9595), "Set14": (33.30, 0.9152)},
    3: {"Set5": (34.06, 0.9248), "Set14": (30.10, 0.8377)},
    4: {
        "Set5": (31.88, 0.8910),
        "Set14": (28.42, 0.7772),
        "B100": (27.45, 0.7315),
        "Urban100": (25.64, 0.7703),
    },
}
_CARN_SHA = "d48a759a84509351facb6b7c6d5bd6edec98b98519b8c464ee4ab44d2ba964ff"
_LMLT_REF = {
    2: {"Set5": (37.99, 0.9606), "Set14": (33.59, 0.9182)},
    3: {"Set5": (34.36, 0.9270), "Set14": (30.38, 0.8428)},
    4: {
        "Set5": (32.19, 0.8947),
        "Set14": (28.65, 0.7824),
        "B100": (27.60, 0.7370),
        "Urban100": (26.08, 0.7838),
    },
}
_LMLT_FILES = {
    2: ("LMLT_tiny_x2.pth", "50087c339ae94ef23a193842fe6abdca048b6320c62a693f92fded975d306504"),
    3: ("LMLT_tiny_x3_new.pth", "cebaeeb09d16b9ae30f72b4ef3b87a262cb0126b8de6ed3f14f822f269a0ad76"),
    4: ("LMLT_tiny_x4_new.pth", "72410dc18b42d22321d62c34fa18713f3744a55f3a6dae6b43b5d10251e67a71"),
}
_ESWT_REF = {
    4: {
        "Set5": (32.46, 0.8979),
        "Set14": (28.80, 0.7866),
        "B100": (27.70, 0.7410),
        "Urban100": (26.56, 0.8006),
    },
}
_SWINIR_REF = {  # 2DQuant Table 3, the published SwinIR-light FP rows
    2: {
        "Set5": (38.15, 0.9611),
        "Set14": (33.86, 0.9206),
        "B100": (32.31, 0.9012),
        "Urban100": (32.76, 0.9340),
    },
    3: {
        "Set5": (34.63, 0.9290),
        "Set14": (30.54, 0.8464),
        "B100": (29.20, 0.8082),
        "Urban100": (28.66, 0.8624),
    },
    4: {
        "Set5": (32.45, 0.8976),
        "Set14": (28.77, 0.7858),
        "B100": (27.69, 0.7406),
        "Urban100": (26.48, 0.7980),
    },
}
_EDSR_HASH = {2: "1bc95232", 3: "abf2a44e", 4: "6b446fab"}

REGISTRY: dict[str, ModelEntry] = {
    "imdn": ModelEntry(
        name="imdn",
        kind="cnn",
        builder=imdn.IMDN,
        scales=(2, 3, 4),
        kwargs={},
        tiny_kwargs=imdn.TINY_KWARGS,
        checkpoints={
            s: Checkpoint(
                f"IMDN_x{s}.pth",
                _gh("Zheng222/IMDN", "master", f"checkpoints/IMDN_x{s}.pth"),
                _IMDN_SHA[s],
                reference=_IMDN_REF[s],
            )
            for s in (2, 3, 4)
        },
        paper="Hui et al., Lightweight Image Super-Resolution with Information Multi-distillation Network, ACM MM 2019",
        source="Zheng222/IMDN @ 8f158e6a",
        layout=QuantLayout(
            body=(r"IMDB\d+\.c[1-5]",),
            post_activation=(r"IMDB\d+\.c[2-5]",),
            fixed_8bit=(r"fea_conv", r"c\.0", r"LR_conv", r"upsampler\.0"),
            never=(r"IMDB\d+\.cca\..*",),
            glue_inputs=(
                (r"(IMDB\d+)\.c2", r"\1.act1_glue"),
                (r"(IMDB\d+)\.c3", r"\1.act2_glue"),
                (r"(IMDB\d+)\.c4", r"\1.act3_glue"),
            ),
            input_parts=((r"IMDB\d+\.c5", 4),),  # the three distilled slices and c4's output
        ),
    ),
    "pan": ModelEntry(
        name="pan",
        kind="cnn",
        builder=pan.PAN,
        scales=(2, 3, 4),
        kwargs={},
        tiny_kwargs=pan.TINY_KWARGS,
        checkpoints={
            s: Checkpoint(
                f"PANx{s}_DF2K.pth",
                _gh("zhaohengyuan1/PAN", "master", f"experiments/pretrained_models/PANx{s}_DF2K.pth"),
                _PAN_SHA[s],
                reference=_PAN_REF[s],
            )
            for s in (2, 3, 4)
        },
        paper="Zhao et al., Efficient Image Super-Resolution Using Pixel Attention, ECCV Workshops 2020",
        source="zhaohengyuan1/PAN @ 4d045d18",
        layout=QuantLayout(
            body=(r"SCPA_trunk\.\d+\..*",),
            fixed_8bit=(r"conv_first", r"trunk_conv", r"upconv\d", r"att\d\.conv", r"HRconv\d", r"conv_last"),
            input_parts=((r"SCPA_trunk\.\d+\.conv3", 2),),  # the plain and the attention branch
        ),
    ),
    "carn-m": ModelEntry(
        name="carn-m",
        kind="cnn",
        builder=carn.CARNM,
        scales=(2, 3, 4),
        kwargs={},
        tiny_kwargs=carn.TINY_KWARGS,
        checkpoints={
            s: Checkpoint(
                "carn_m.pth",
                _gh("nmhkahn/CARN-pytorch", "master", "checkpoint/carn_m.pth"),
                _CARN_SHA,
                reference=_CARN_REF[s],
            )
            for s in (2, 3, 4)
        },
        paper="Ahn et al., Fast, Accurate, and Lightweight Super-Resolution with Cascading Residual Network, ECCV 2018",
        source="nmhkahn/CARN-pytorch @ 40d3514f",
        layout=QuantLayout(
            body=(r"b[123]\..*", r"c[123]\..*"),
            fixed_8bit=(r"entry", r"upsample\..*", r"exit"),
            never=(r"(sub|add)_mean\..*",),
            # Convs that read another conv's output through ReLU / pixel shuffle only share its output grid.
            glue_inputs=(
                (r"(b\d\.b1\.body)\.2", r"\1.0.output_quantizer"),
                (r"(b\d\.b1\.body)\.4", r"\1.2.output_quantizer"),
                (r"(upsample\.up4\.body)\.3", r"\1.0.output_quantizer"),
                (r"exit", "upsample.up{scale}.body.3.output_quantizer|upsample.up{scale}.body.0.output_quantizer"),
            ),
            # The cascades' 1x1 fusion convs read the entry features and one, two or three units' outputs. The
            # outer ones (`c1`-`c3`, 128-256 channels of the entry features and three blocks' outputs) get one grid
            # per channel: floating their inputs was worth +2.17 dB on Set5 and +0.95 dB on held-out training crops
            # on a W2A2 per-part checkpoint (benchmarks/input_ablation.py).
            input_parts=(
                (r"c[123]\.body\.0", PER_CHANNEL),
                (r"b\d\.c1\.body\.0", 2),
                (r"b\d\.c2\.body\.0", 3),
                (r"b\d\.c3\.body\.0", 4),
            ),
        ),
        license="MIT",
        note="one multi-scale checkpoint serves x2, x3 and x4",
    ),
    "lmlt-tiny": ModelEntry(
        name="lmlt-tiny",
        kind="transformer",
        builder=lmlt.LMLT,
        scales=(2, 3, 4),
        kwargs={"dim": 36, "n_blocks": 8, "ffn_scale": 2.0},
        tiny_kwargs=lmlt.TINY_KWARGS,
        checkpoints={
            s: Checkpoint(
                _LMLT_FILES[s][0],
                _gh("jwgdmkj/LMLT", "main", f"experiments/pretrained_model/{_LMLT_FILES[s][0]}"),
                _LMLT_FILES[s][1],
                state_key="params",
                reference=_LMLT_REF[s],
            )
            for s in (2, 3, 4)
        },
        paper="Kim et al., LMLT: Low-to-high Multi-Level Vision Transformer for Image Super-Resolution, 2024",
        source="jwgdmkj/LMLT @ 8602015f",
        layout=QuantLayout(
            body=(r"feats\.\d+\.lhsb\.mfr\.\d+\.(qkv|proj)", r"feats\.\d+\.lhsb\.aggr", r"feats\.\d+\.ccm\.ccm\.2"),
            post_activation=(r"feats\.\d+\.ccm\.ccm\.2",),
            fixed_8bit=(r"to_feat", r"feats\.\d+\.ccm\.ccm\.0", r"to_img\.0"),
            weight_groups=((r"feats\.\d+\.lhsb\.mfr\.\d+\.qkv", 3),),
            # the four pooling levels; the CCM 1x1 reads a GELU output whose channels' ranges differ about 3x
            input_parts=((r"feats\.\d+\.lhsb\.aggr", 4), (r"feats\.\d+\.ccm\.ccm\.2", PER_CHANNEL)),
        ),
        license="MIT",
    ),
    "eswt": ModelEntry(
        name="eswt",
        kind="transformer",
        builder=eswt.ESWT,
        scales=(4,),
        kwargs={},
        tiny_kwargs=eswt.TINY_KWARGS,
        checkpoints={
            4: Checkpoint(
                "ESWT-24-6_LSR_x4.pth",
                _gh("Fried-Rice-Lab/FriedRiceLab", "master", "modelzoo/ESWT/ESWT-24-6_LSR_x4.pth"),
                "2dfa31949048fbe1e5f991766c63e654f519230aabeb1056526fbbfc64e26f9c",
                state_key="params",
                reference=_ESWT_REF[4],
            )
        },
        paper="Shi et al., Image Super-Resolution using Efficient Striped Window Transformer, 2023",
        source="Fried-Rice-Lab/FriedRiceLab @ c3899fb3",
        layout=QuantLayout(
            body=(r"body\.\d+\.sa_list\.\d+\.(attn|proj)\.0", r"body\.\d+\.mlp_list\.\d+\.fc[12]"),
            post_activation=(r"body\.\d+\.mlp_list\.\d+\.fc2",),
            fixed_8bit=(r"head\.0", r"body\.\d+\.conv\.0", r"tail\.0"),
            weight_groups=((r"body\.\d+\.sa_list\.\d+\.attn\.0", 2),),
            # the two striped-window branches; the MLP's reducing conv reads a SiLU output, one grid per channel
            input_parts=((r"body\.\d+\.sa_list\.\d+\.proj\.0", 2), (r"body\.\d+\.mlp_list\.\d+\.fc2", PER_CHANNEL)),
        ),
        license="MIT",
    ),
    "swinir-light": ModelEntry(
        name="swinir-light",
        kind="transformer",
        builder=swinir.SwinIR,
        scales=(2, 3, 4),
        kwargs={},
        tiny_kwargs=swinir.TINY_KWARGS,
        checkpoints={
            s: Checkpoint(
                f"002_lightweightSR_DIV2K_s64w8_SwinIR-S_x{s}.pth",
                "https://github.com/JingyunLiang/SwinIR/releases/download/v0.0/"
                f"002_lightweightSR_DIV2K_s64w8_SwinIR-S_x{s}.pth",
                None,
                state_key="params",
                reference=_SWINIR_REF[s],
            )
            for s in (2, 3, 4)
        },
        paper="Liang et al., SwinIR: Image Restoration Using Swin Transformer, ICCV Workshops 2021",
        source="JingyunLiang/SwinIR",
        layout=QuantLayout(
            body=(r"layers\.\d+\.residual_group\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12])",),
            post_activation=(r".*\.mlp\.fc2",),
            fixed_8bit=(r"conv_first", r"layers\.\d+\.conv", r"conv_after_body", r"upsample\.0"),
            weight_groups=((r".*\.attn\.qkv", 3),),
        ),
        license="Apache-2.0",
        note="not shipped here; sha256 of the release files unknown",
    ),
    "edsr-baseline": ModelEntry(
        name="edsr-baseline",
        kind="cnn",
        builder=edsr.EDSR,
        scales=(2, 3, 4),
        kwargs={},
        tiny_kwargs=edsr.TINY_KWARGS,
        checkpoints={
            s: Checkpoint(
                f"edsr_baseline_x{s}-{_EDSR_HASH[s]}.pt",
                f"https://cv.snu.ac.kr/research/EDSR/models/edsr_baseline_x{s}-{_EDSR_HASH[s]}.pt",
                None,
            )
            for s in (2, 3, 4)
        },
        paper="Lim et al., Enhanced Deep Residual Networks for Single Image Super-Resolution, CVPRW 2017",
        source="sanghyun-son/EDSR-PyTorch",
        layout=QuantLayout(
            body=(r"body\.\d+\.body\.[02]",),
            post_activation=(r"body\.\d+\.body\.2",),
            fixed_8bit=(r"head\.0", r"body\.\d+", r"tail\..*"),
        ),
        license="MIT",
        note="not shipped here; the file names carry a sha256 prefix, the full digest is unknown",
    ),
    "rdn": ModelEntry(
        name="rdn",
        kind="cnn",
        builder=rdn.RDN,
        scales=(2, 3, 4),
        kwargs={},
        tiny_kwargs=rdn.TINY_KWARGS,
        checkpoints={},
        paper="Zhang et al., Residual Dense Network for Image Super-Resolution, CVPR 2018",
        source="sanghyun-son/EDSR-PyTorch (src/model/rdn.py)",
        layout=QuantLayout(
            body=(r"RDBs\.\d+\.convs\.\d+\.conv\.0", r"RDBs\.\d+\.LFF"),
            fixed_8bit=(r"SFENet[12]", r"GFF\.\d", r"UPNet\.\d"),
        ),
        license="MIT",
        note="no public direct-download checkpoint; load your own with --weights",
    ),
    "srresnet": ModelEntry(
        name="srresnet",
        kind="cnn",
        builder=srresnet.SRResNet,
        scales=(2, 3, 4),
        kwargs={},
        tiny_kwargs=srresnet.TINY_KWARGS,
        checkpoints={},
        paper="Ledig et al., Photo-Realistic Single Image Super-Resolution Using a GAN, CVPR 2017",
        source="Cheeun/AdaBM (src/model/srresnet.py)",
        layout=QuantLayout(
            body=(r"body\.\d+\.conv[12]",),
            fixed_8bit=(r"head\.0", r"body\.\d+", r"tail\..*"),
        ),
        note="no public direct-download checkpoint; load your own with --weights",
    ),
}


def get_entry(name: str) -> ModelEntry:
    """Find a zoo entry by name (case-insensitive); an unknown name lists the known ones."""
    key = name.strip().lower().replace("_", "-")
    if key not in REGISTRY:
        raise SrquantError(f"unknown model {name!r}; known: {', '.join(REGISTRY)}")
    return REGISTRY[key]


def build_model(name: str, scale: int, tiny: bool = False, **overrides: Any) -> nn.Module:
    """Build an architecture with random weights (full size or its tiny test variant).

    The network carries `srquant_arch`, the record `build_from_record` rebuilds it from (a quantized checkpoint
    stores it).
    """
    entry = get_entry(name)
    if scale not in entry.scales:
        raise SrquantError(f"{entry.name} supports x{', x'.join(map(str, entry.scales))}, not x{scale}")
    kwargs = dict(entry.tiny_kwargs if tiny else entry.kwargs)
    kwargs.update(overrides)
    model = entry.builder(scale=scale, **kwargs)
    setattr(model, ARCH_ATTRIBUTE, {"kind": "zoo", "name": entry.name, "scale": scale, "kwargs": kwargs})
    return model


def architecture_record(model: nn.Module) -> dict[str, Any]:
    """How to rebuild a network: the record `build_model` or `models.user` attached; one line without one."""
    record = getattr(model, ARCH_ATTRIBUTE, None)
    if not isinstance(record, dict):
        raise SrquantError(
            f"{type(model).__name__} carries no architecture record: build it with srquant's zoo, or give it to "
            "srquant.quantize (which records its file and class)"
        )
    return record


def build_from_record(record: Mapping[str, Any]) -> nn.Module:
    """Rebuild a network (random weights) from its architecture record: a zoo entry or a user's file."""
    if record.get("kind") == "zoo":
        model = build_model(str(record["name"]), int(record["scale"]), **dict(record.get("kwargs", {})))
        if "layout" in record:  # the layout it was quantized with (the zoo entry's may have changed since)
            architecture_record(model)["layout"] = record["layout"]
        return model
    if record.get("kind") == "file":
        return user.rebuild(record)
    raise SrquantError(f"unknown architecture record kind {record.get('kind')!r}")


def layout_to_record(layout: QuantLayout) -> dict[str, Any]:
    """A layout as plain lists (for an architecture record)."""
    return {key: [list(v) if isinstance(v, tuple) else v for v in value] for key, value in asdict(layout).items()}


def layout_of(model: nn.Module) -> QuantLayout:
    """The quantization layout of a network: the one recorded with it (an inferred or a given one), else its zoo
    entry's."""
    record = architecture_record(model)
    stored = record.get("layout")
    if stored is None and record.get("kind") == "zoo":
        return get_entry(str(record["name"])).layout
    if stored is None:
        raise SrquantError(f"{type(model).__name__} has no recorded layout: quantize it through srquant.quantize")
    return QuantLayout(
        **{k: tuple(tuple(v) if isinstance(v, list) else v for v in values) for k, values in stored.items()}
    )


ZIP_MAGIC = b"PK\x03\x04"
STATE_KEYS = ("params_ema", "params", "state_dict", "model")  # where training frameworks put the weights


def load_torch_file(path: str | Path, map_location: torch.device | str = "cpu") -> Any:
    """`torch.load` with `weights_only=True` (nothing in the file can run code), with srquant's own one-line
    error for a missing, empty, truncated or foreign file, or one that holds more than tensors and containers."""
    path = Path(path)
    if not path.is_file():
        raise SrquantError(f"checkpoint not found: {path}" if not path.is_dir() else f"{path} is a folder, not a file")
    if path.stat().st_size == 0:
        raise SrquantError(f"{path} is empty (0 bytes): not a checkpoint")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # protocol notes from the weights-only unpickler
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "GLOBAL" in str(err):  # the weights-only unpickler met a class or function to import
            raise SrquantError(
                f"{path} holds objects other than tensors and plain containers; srquant does not load such files, "
                "since loading them could run code"
            ) from None
        raise SrquantError(f"{path} is not a PyTorch checkpoint") from None
    except Exception:  # noqa: BLE001 - every other failure is one of the two cases below
        with open(path, "rb") as handle:
            zipped = handle.read(4) == ZIP_MAGIC
        reason = "is truncated or corrupt" if zipped else "is not a PyTorch checkpoint"
        raise SrquantError(f"{path} {reason}") from None


def first_non_finite(module: nn.Module) -> str | None:
    """The name of the first parameter or buffer holding NaN or inf, or None."""
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def check_finite(module: nn.Module, origin: str) -> None:
    """Refuse a network with NaN/inf weights, naming the first bad tensor."""
    bad = first_non_finite(module)
    if bad is not None:
        raise SrquantError(f"{origin}: tensor {bad} holds NaN/inf values")


def read_state_dict(path: Path, state_key: str | None = None) -> dict[str, torch.Tensor]:
    """Read a state dict with `weights_only=True`; a file that is not a checkpoint raises one line."""
    obj = load_torch_file(path)
    if not isinstance(obj, dict):
        raise SrquantError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    if str(obj.get("format", "")).startswith("srquant-quantized"):
        raise SrquantError(f"{path} is an srquant quantized checkpoint, not float weights; pass it as --model FILE")
    if state_key is not None and state_key in obj and isinstance(obj[state_key], dict):
        obj = obj[state_key]
    elif state_key is None:
        inner = next((k for k in STATE_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is not None:
            log.info("%s: using its %r weights", path.name, inner)
            obj = obj[inner]
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def _summarise(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def load_state_strict(model: nn.Module, state: Mapping[str, torch.Tensor], origin: str) -> None:
    """Load a state dict strictly; any mismatch raises one line naming missing, unexpected, mis-shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys: {_summarise(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_summarise(unexpected)}")
        if shapes:
            parts.append(f"shape mismatch: {_summarise(shapes, 2)}")
        raise SrquantError(f"{origin} does not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def checkpoint_path(entry: ModelEntry, scale: int, assets: str | Path | None, allow_download: bool) -> Path:
    """Locate (or, if allowed, download into the cache) the sha256-verified checkpoint of an entry."""
    ckpt = entry.checkpoint(scale)
    if ckpt is None:
        have = ", ".join(f"x{s}" for s in entry.checkpoints) or "none"
        raise SrquantError(f"{entry.name} has no pretrained checkpoint for x{scale} (available: {have})")
    candidates = [asset_dir(assets) / "weights" / ckpt.filename, user_cache_dir() / "weights" / ckpt.filename]
    for path in candidates:
        if path.is_file():
            verify_sha256(path, ckpt.sha256)
            return path
    if not allow_download or ckpt.url is None:
        raise SrquantError(
            f"checkpoint {ckpt.filename} for {entry.name} x{scale} not found in {candidates[0].parent}"
            + (" (pass --download to fetch it)" if ckpt.url else "")
        )
    return download(ckpt.url, candidates[1], ckpt.sha256)


def create_model(
    name: str,
    scale: int,
    pretrained: bool = True,
    assets: str | Path | None = None,
    weights: str | Path | None = None,
    allow_download: bool = False,
    tiny: bool = False,
) -> nn.Module:
    """Build a zoo model in eval mode, with its released weights (or the `weights` file) loaded strictly."""
    entry = get_entry(name)
    model = build_model(name, scale, tiny=tiny)
    if weights is not None:
        path = Path(weights)
        load_state_strict(model, read_state_dict(path), str(path))
        check_finite(model, str(path))
    elif pretrained:
        if tiny:
            raise SrquantError("tiny variants have no pretrained weights")
        path = checkpoint_path(entry, scale, assets, allow_download)
        ckpt = entry.checkpoint(scale)
        load_state_strict(model, read_state_dict(path, ckpt.state_key if ckpt else None), str(path))
        check_finite(model, str(path))
    return model.eval()
