"""Chains and step costs of the Wan 2.1 / Qwen-Image, Flux.2 and TAESD coders (vaetool.memory_estimate uses these tables).

`ARCHITECTURES` maps a model class to the function that reads its `Arch` (the chains of steps of
both coders); `STEP_COSTS` gives the cost of each step kind these chains add, counted, like the
LDM kinds in memory_estimate, as the tensors alive at the step's worst moment in the order the
forward code allocates and frees them (inference mode). Images only: a Wan image is one frame.

- Flux.2: the LDM coders (memory_estimate's own kinds), with the quant convs inside the coders.
- Wan: `wres`, a residual block whose RMS_norm holds three activations at once (the normalised
  input, times sqrt(C), times gamma) and whose SiLU is out of place; `wattn`, the mid-block
  attention (the norm, the qkv conv output, contiguous q, k, v and the output); `wup`, the phase
  upsample (nn.blocks.upsample_conv_phases: the padded input, the 4x output, one phase's output)
  that halves the width; `whead`, RMS_norm, SiLU and the output conv.
- TAESD: `tblock` (conv-ReLU-conv-ReLU-conv, skip, ReLU, all out of place), `sconv` (the stride-2
  conv), `tup` (nn.Upsample's 4x copy, then a conv), `act` (one out-of-place pointwise op) and
  `affine` (two: the [0, 1] <-> [-1, 1] mapping).

Calibrated by measured peak RSS on CPU (bench/calibrate_memory.py --configs wan flux2 taesd,
docs/memory.md); the constants CONV_WORKSPACE and SAFETY are memory_estimate's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from vaetool.memory_steps import HALF_DECODE_RETAINED, Arch, Step, attention_bytes, decoder_steps, encoder_steps, resolve_attention
from vaetool.nn.flux2 import Flux2Autoencoder
from vaetool.nn.taesd import TAESD, Block, Clamp
from vaetool.nn.wan import AttentionBlock, Resample, ResidualBlock, WanVAE

__all__ = ["ARCHITECTURES", "STEP_COSTS"]

StepCost = Callable[[Step, tuple[int, int], int, int, dict[str, Any]], tuple[int, int]]


# Decode holds a few weight-sized temporaries the chain does not count (oneDNN's reordered weights, the phase
# upsample's kernels), and its RSS varies between runs (Flux.2 at 128 px: 260-278 MiB in 5 runs). Fitted as a
# constant plus a multiple of the largest conv's weights (elements) so that every measured decode at 128-512 px
# lies at 1.0-1.15 of the estimate (bench/calibrate_memory.py; TAESD at 128 px: 1.01-1.17, its spread is 15 %).
DECODE_OVERHEAD = (512 * 1024, 1.45)


# TAESD's convs have no norm, so the tiled executor copies each window zero-padded where the forward lets the conv pad:
# its tiles hold ~1.3x the forward's working set (measured: 512 px, fast 128 px and exact 256 px tiles).
TAESD_TILE_SCALE = 1.3


def _params(*mods: nn.Module) -> int:
    return sum(p.numel() for m in mods for p in m.parameters())


def _decode_overhead(*mods: nn.Module) -> dict[str, int]:
    """Arch.overhead for a decoder: DECODE_OVERHEAD for its largest conv (the 2D taps of a causal 3D conv)."""
    largest = max(m.weight.numel() // (m.kernel_size[0] if m.weight.ndim == 5 else 1)
                  for mod in mods for m in mod.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d)))  # fmt: skip
    base, per_weight = DECODE_OVERHEAD
    return {"decode": int(base + per_weight * largest)}


# ---------------------------------------------------------------- the chains


def flux2_arch(model: Flux2Autoencoder) -> Arch:
    """The LDM chains, with the 1x1 quant convs the Flux.2 coders hold themselves."""
    enc, dec = model.encoder, model.decoder
    levels = enc.num_resolutions - 1
    return Arch(
        encode=tuple(encoder_steps(enc, enc.quant_conv)),
        decode=tuple(decoder_steps(dec, dec.post_quant_conv, levels)),
        weights={"encode": _params(enc), "decode": _params(dec)},
        downscale=2**levels,
        in_channels=enc.conv_in.in_channels,
        latent_channels=dec.post_quant_conv.in_channels,
        overhead=_decode_overhead(dec),
        half_overhead={"decode": int(HALF_DECODE_RETAINED * _params(dec))},  # the LDM decoder's (memory_steps)
    )


def _wan_blocks(blocks: nn.Module, level: int) -> tuple[list[Step], int]:
    """Steps of a run of Wan blocks starting at `level`, and the level after them."""
    steps = []
    for m in blocks:
        if isinstance(m, ResidualBlock):
            conv1, conv2 = m.residual[2], m.residual[6]
            steps.append(Step("wres", conv1.in_channels, conv2.out_channels, level))
        elif isinstance(m, AttentionBlock):
            steps.append(Step("wattn", m.proj.in_channels, m.proj.out_channels, level))
        elif isinstance(m, Resample):
            conv = m.resample[1]
            up = m.mode.startswith("up")
            steps.append(Step("wup" if up else "down", conv.in_channels, conv.out_channels, level))
            level += -1 if up else 1
    return steps, level


def wan_arch(model: WanVAE) -> Arch:
    """One frame through Encoder3d + conv1, and conv2 + Decoder3d (the causal convs run as 2D convs)."""
    enc, dec = model.encoder, model.decoder
    down, level = _wan_blocks([*enc.downsamples, *enc.middle], 0)
    encode = [Step("conv", enc.conv1.in_channels, enc.conv1.out_channels, 0), *down,
              Step("whead", enc.head[2].in_channels, enc.head[2].out_channels, level),
              Step("conv", model.conv1.in_channels, model.conv1.out_channels, level)]  # fmt: skip
    up, out_level = _wan_blocks([*dec.middle, *dec.upsamples], level)
    decode = [Step("conv", model.conv2.in_channels, model.conv2.out_channels, level),
              Step("conv", dec.conv1.in_channels, dec.conv1.out_channels, level), *up,
              Step("whead", dec.head[2].in_channels, dec.head[2].out_channels, out_level)]  # fmt: skip
    return Arch(
        encode=(*encode, Step("copy", encode[-1].cout, encode[-1].cout, level)),
        decode=(*decode, Step("copy", decode[-1].cout, decode[-1].cout, out_level)),
        weights={"encode": _params(enc, model.conv1), "decode": _params(dec, model.conv2)},
        downscale=model.downscale,
        in_channels=enc.conv1.in_channels,
        latent_channels=model.conv2.in_channels,
        overhead=_decode_overhead(dec, model.conv2),
    )


def _taesd_steps(layers: nn.Sequential, level: int, direction: int) -> tuple[list[Step], int]:
    """Steps of a TAESD Sequential; `direction` is +1 (encoder: stride-2 convs) or -1 (decoder: upsamples)."""
    steps: list[Step] = []
    upsample = False
    for m in layers:
        if isinstance(m, Block):
            steps.append(Step("tblock", m.conv[0].in_channels, m.conv[4].out_channels, level))
        elif isinstance(m, (Clamp, nn.ReLU)):
            c = steps[-1].cout if steps else _in_channels(layers)
            steps.append(Step("act", c, c, level))
        elif isinstance(m, nn.Upsample):
            upsample = True
        elif isinstance(m, nn.Conv2d):
            kind = "tup" if upsample else "sconv" if m.stride[0] > 1 else "conv"
            steps.append(Step(kind, m.in_channels, m.out_channels, level))
            level += -1 if upsample else 1 if m.stride[0] > 1 else 0
            upsample = False
    return steps, level


def _in_channels(layers: nn.Sequential) -> int:
    """Input channels of a TAESD Sequential (its first conv's)."""
    return next(m.in_channels for m in layers if isinstance(m, nn.Conv2d))


def taesd_arch(model: TAESD) -> Arch:
    """The encoder and decoder Sequentials, with the pointwise conversions at their ends."""
    enc, level = _taesd_steps(model.encoder, 0, 1)
    dec, out_level = _taesd_steps(model.decoder, level, -1)
    encode = [Step("affine", 3, 3, 0), *enc, Step("copy", 2 * enc[-1].cout, 2 * enc[-1].cout, level)]
    decode = [*dec, Step("affine", 3, 3, out_level), Step("copy", 3, 3, out_level)]
    return Arch(
        encode=tuple(encode),
        decode=tuple(decode),
        weights={"encode": _params(model.encoder), "decode": _params(model.decoder)},
        downscale=model.downscale,
        in_channels=3,
        latent_channels=model.embed_dim,
        overhead=_decode_overhead(model.decoder),
        tile_scale=TAESD_TILE_SCALE,
    )


ARCHITECTURES: dict[type, Callable[[Any], Arch]] = {WanVAE: wan_arch, Flux2Autoencoder: flux2_arch, TAESD: taesd_arch}


# ---------------------------------------------------------------- the costs of their steps


def _acts(st: Step, hw: tuple[int, int], b: int, elem: int) -> tuple[float, float]:
    """Bytes of one input and one output activation [b, c, h, w] at the step's input size."""
    px = hw[0] * hw[1]
    return float(b * st.cin * px * elem), float(b * st.cout * px * elem)


def _half_norm(elem: int) -> float:
    """RMS_norm's float32 copy of a half input and its float32 result, in activations of that input (0 in fp32).

    Measured (bench/calibrate_memory.py --configs wan --dtype bf16): without it bf16 encode and
    decode at 512 px fell to 0.95 of the measured peak; the norm holds x, x.float() and the float
    result (5 half-size activations), where the fp32 count has 3.
    """
    return 2 * 4 / elem if elem < 4 else 0.0


def _wres(st: Step, hw: tuple[int, int], b: int, elem: int, ctx: dict[str, Any]) -> tuple[int, int]:
    ci, co = _acts(st, hw, b, elem)
    ws, half = ctx["ws"], _half_norm(elem)
    short = co + ws * ci if st.cin != st.cout else 0.0  # a 1x1 conv shortcut, else x itself
    peak = max(3 * ci, ci + co + ws * ci, 4 * co, 2 * co + ws * co, 2 * co + short, (3 if short else 2) * co)
    peak = max(peak, half * ci, co + half * co)  # half inputs: each norm's float32 copies (the second with conv1's output)
    return int(peak), int(co)


def _wattn(st: Step, hw: tuple[int, int], b: int, elem: int, ctx: dict[str, Any]) -> tuple[int, int]:
    ci, _ = _acts(st, hw, b, elem)
    ws, n = ctx["ws"], hw[0] * hw[1]
    work = attention_bytes(ctx["attention"], b, n, st.cin, elem, ctx["device"])
    if resolve_attention(ctx["attention"], b, n, elem, ctx["device"]) in ("sdpa", "xformers"):
        work = 0  # the block already passes contiguous q, k, v (counted below): the fused kernels add O(n)
    peak = max(3 * ci, 4 * ci + ws * ci, 7 * ci + work, 6 * ci + ws * ci)  # qkv, q/k/v copies, output; then proj
    peak = max(peak, _half_norm(elem) * ci)  # half inputs: the norm's float32 copies
    return int(peak), int(ci)


def _wup(st: Step, hw: tuple[int, int], b: int, elem: int, ctx: dict[str, Any]) -> tuple[int, int]:
    ci, co = _acts(st, hw, b, elem)
    pad = ci * (hw[0] + 2) * (hw[1] + 2) / (hw[0] * hw[1])
    return int(pad + 4 * co + co + ctx["ws"] * ci), int(4 * co)  # padded input, the 4x output, one phase


def _whead(st: Step, hw: tuple[int, int], b: int, elem: int, ctx: dict[str, Any]) -> tuple[int, int]:
    ci, co = _acts(st, hw, b, elem)
    return int(max(3 * ci, ci + co + ctx["ws"] * ci, _half_norm(elem) * ci)), int(co)


def _tblock(st: Step, hw: tuple[int, int], b: int, elem: int, ctx: dict[str, Any]) -> tuple[int, int]:
    ci, co = _acts(st, hw, b, elem)
    ws = ctx["ws"]
    short = co + ws * ci if st.cin != st.cout else 0.0
    return int(max(co + ws * ci, 2 * co + ws * co, 2 * co + short)), int(co)


def _sconv(st: Step, hw: tuple[int, int], b: int, elem: int, ctx: dict[str, Any]) -> tuple[int, int]:
    ci, _ = _acts(st, hw, b, elem)
    out = float(b * st.cout * -(-hw[0] // 2) * -(-hw[1] // 2) * elem)
    return int(out + ctx["ws"] * ci), int(out)


def _tup(st: Step, hw: tuple[int, int], b: int, elem: int, ctx: dict[str, Any]) -> tuple[int, int]:
    ci, co = _acts(st, hw, b, elem)
    return int(max(4 * ci, 3 * ci + 4 * co + 4 * ctx["ws"] * ci)), int(4 * co)  # the input is freed after the upsample


def _act(st: Step, hw: tuple[int, int], b: int, elem: int, ctx: dict[str, Any]) -> tuple[int, int]:
    _, co = _acts(st, hw, b, elem)
    return int(co), int(co)


def _affine(st: Step, hw: tuple[int, int], b: int, elem: int, ctx: dict[str, Any]) -> tuple[int, int]:
    _, co = _acts(st, hw, b, elem)
    return int(2 * co), int(co)


STEP_COSTS: dict[str, StepCost] = {
    "wres": _wres, "wattn": _wattn, "wup": _wup, "whead": _whead,
    "tblock": _tblock, "sconv": _sconv, "tup": _tup, "act": _act, "affine": _affine,
}  # fmt: skip
