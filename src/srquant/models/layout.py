"""Per-architecture quantization layout: plain data the zoo publishes; no quantization code here."""

from __future__ import annotations

from dataclasses import dataclass

PER_CHANNEL = 0
"""An `input_parts` count meaning one grid per input channel (a part per channel)."""


@dataclass(frozen=True)
class QuantLayout:
    """Which layers of one architecture are which, by regular expressions on module names.

    body: the layers quantized by default (CNN body convs; for transformers the token-wise linear layers,
        including 1x1 convs that act as linear layers);
    post_activation: layers whose input follows GELU/SiLU (an exponential-like, one-sided distribution);
    fixed_8bit: the remaining convs that a "fully quantized" model runs at W8A8 (head, upsampler, tail);
    never: modules that are never quantized (fixed mean-shift layers, attention gates and the like);
    weight_groups: fused layers whose weight gets one bound pair per slice along the output dimension
        (a fused qkv projection quantized as separate q, k and v weights, as 2DQuant does);
    glue_inputs: (layer pattern, source) pairs for layers that read a slice of a ``*_glue`` tensor, or another
        layer's output through ReLU / pixel shuffle only (source ``<layer>.output_quantizer``). The source may
        use the pattern's groups (as in ``re.Match.expand``), ``{scale}``, and ``|``-separated alternatives
        (the first that exists is taken). With quantized glue such a layer shares the source's grid instead of
        rounding the values to a second one, so an integer graph passes the uint8 tensor straight on.
    input_parts: (layer pattern, parts) pairs for convs whose input is a concatenation of `parts` equal channel
        parts from different sources (whose ranges differ); with per-part activation grids each part gets its own.
        `parts` = `PER_CHANNEL` gives every input channel its own grid, for a conv that reads an activation whose
        channels' ranges differ widely (the transformers' feed-forward reducing convs).
    """

    body: tuple[str, ...]
    post_activation: tuple[str, ...] = ()
    fixed_8bit: tuple[str, ...] = ()
    never: tuple[str, ...] = ()
    weight_groups: tuple[tuple[str, int], ...] = ()
    glue_inputs: tuple[tuple[str, str], ...] = ()
    input_parts: tuple[tuple[str, int], ...] = ()
