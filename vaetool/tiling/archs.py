"""Tile programs of the families outside the LDM coders: the Wan 2.1 / Qwen-Image VAE, Flux.2 and TAESD.

`PROGRAMS` maps a model class to its (encoder, decoder) program builders; `coder_program` looks a
model up there, else reads it as the LDM coders (vaetool.tiling.program). The programs are images only:

- Wan: an image is one frame, and a causal conv that sees one frame after zeros is a 2D conv with
  its kernel's last time tap (what `CausalConv3d.last_tap` runs). RMS_norm normalises each pixel
  over its channels, so it needs no statistics: it is a pointwise `pre` of the next conv, and
  exact tiles need only halos. The temporal up/downsamples do nothing to a lone frame.
- Flux.2: the LDM coders with their 1x1 quant convs inside; GroupNorm as for SD (pooled
  statistics in exact mode, the mosaic's fixed statistics in fast mode).
- TAESD: plain convs, ReLU, nearest upsampling, no normalisation; the parent family's latent
  conversion and the [0, 1] <-> [-1, 1] image mapping are pointwise ops at the ends.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from vaetool.nn.blocks import is_plain_conv, upsample_conv_phases
from vaetool.nn.causal import CausalConv3d
from vaetool.nn.flux2 import Flux2Autoencoder
from vaetool.nn.taesd import DETERMINISTIC_LOGVAR, TAESD, Block, Clamp
from vaetool.nn.wan import AttentionBlock, Resample, ResidualBlock, RMS_norm, WanVAE
from vaetool.tiling.program import (
    IDENTITY,
    GlobalOp,
    Program,
    TensorFn,
    TilingUnsupported,
    Window,
    WindowOp,
    conv_window,
    decoder_program,
    encoder_program,
    sd_decoder_program,
    sd_encoder_program,
)

__all__ = ["PROGRAMS", "causal_window", "coder_program"]


def causal_window(m: CausalConv3d) -> Window:
    """A causal conv on one frame with only zeros before it, as a 2D window: the kernel's last time tap."""
    if m.time_pad and m.kernel_size[0] != m.time_pad + 1:
        raise TilingUnsupported(f"causal conv with time kernel {m.kernel_size[0]} and {m.time_pad} past frames cannot be tiled")
    if m.padding_mode != "zeros":
        raise TilingUnsupported(f"causal conv with padding mode {m.padding_mode!r} cannot be tiled")
    kernel = tuple(d * (k - 1) + 1 for k, d in zip(m.kernel_size[1:], m.dilation[1:], strict=False))

    def fn(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, m.weight[:, :, -1], m.bias, m.stride[1:], 0, m.dilation[1:], m.groups)  # [N, Cout, h', w']

    return Window(fn, kernel, tuple(m.stride[1:]), tuple(m.padding[1:]), tuple(m.padding[1:]))  # type: ignore[arg-type]


def _rms_silu(norm: RMS_norm) -> TensorFn:
    """silu(RMS_norm(x)) on frames [N, C, h, w], through the module itself (its gamma is [C, 1, 1, 1])."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        return F.silu(norm(x[:, :, None])[:, :, 0], inplace=True)  # [N, C, h, w]

    return fn


def _phase_up(conv: nn.Conv2d) -> Window:
    """Nearest x2 then `conv`, computed as phase convs when the conv is a plain 3x3."""
    window = conv_window(conv)
    return replace(window, phases=lambda t: upsample_conv_phases(t, conv)) if is_plain_conv(conv, (3,)) else window


def _down(conv: nn.Conv2d) -> Window:
    """Zero pad right/bottom by one, then a stride-2 conv without padding."""
    w = conv_window(conv)
    return Window(w.fn, w.kernel, w.stride, (0, 0), (1, 1))


# ---------------------------------------------------------------- Wan 2.1 / Qwen-Image


def _wan_residual(p: Program, m: ResidualBlock, x: str) -> str:
    norm1, _, conv1, norm2, _, _, conv2 = m.residual
    if isinstance(m.shortcut, CausalConv3d):  # the shortcut runs in conv1's pass, on the raw source
        sc = p.slot()
        h = p.add(WindowOp(x, p.slot(), causal_window(conv1), pre=_rms_silu(norm1), side=causal_window(m.shortcut), side_out=sc))
    else:
        sc, h = x, p.add(WindowOp(x, p.slot(), causal_window(conv1), pre=_rms_silu(norm1)))
    return p.add(WindowOp(h, p.slot(), causal_window(conv2), pre=_rms_silu(norm2), residual=sc))


def _wan_attention(p: Program, m: AttentionBlock, x: str) -> str:
    def fn(t: torch.Tensor) -> torch.Tensor:
        return t + m.attend(t)  # [N, C, h, w]

    return p.add(GlobalOp(x, p.slot(), fn))


def _wan_resample(p: Program, m: Resample, x: str) -> str:
    conv = m.resample[1]
    if m.mode.startswith("up"):
        return p.add(WindowOp(x, p.slot(), _phase_up(conv), upsample=True))
    return p.add(WindowOp(x, p.slot(), _down(conv)))


WAN_BLOCKS: dict[type, Callable[..., str]] = {ResidualBlock: _wan_residual, AttentionBlock: _wan_attention, Resample: _wan_resample}


def _wan_blocks(p: Program, blocks: nn.Module, x: str) -> str:
    for m in blocks:
        build = WAN_BLOCKS.get(type(m))
        if build is None:
            raise TilingUnsupported(f"Wan block {type(m).__name__} cannot be tiled")
        x = build(p, m, x)
    return x


def wan_encoder_program(model: WanVAE) -> Program:
    """Image [N, 3, H, W] -> moments [N, 2z, H/f, W/f], as `WanVAE.encode_moments` (one frame)."""
    enc, p = model.encoder, Program()
    x = p.add(WindowOp(p.input, p.slot(), causal_window(enc.conv1)))
    x = _wan_blocks(p, enc.middle, _wan_blocks(p, enc.downsamples, x))
    x = p.add(WindowOp(x, p.slot(), causal_window(enc.head[2]), pre=_rms_silu(enc.head[0])))
    p.add(WindowOp(x, p.slot(), causal_window(model.conv1)))
    p.factor = 1 / model.downscale
    return p


def wan_decoder_program(model: WanVAE, frames: int = 1) -> Program:
    """Latent [N, z, h, w] -> image [N, 3, h*f, w*f] in [-1, 1], as `WanVAE.decode` (one frame)."""
    dec, p = model.decoder, Program()
    x = p.add(WindowOp(p.input, p.slot(), causal_window(model.conv2)))
    x = p.add(WindowOp(x, p.slot(), causal_window(dec.conv1)))
    x = _wan_blocks(p, dec.upsamples, _wan_blocks(p, dec.middle, x))
    p.add(WindowOp(x, p.slot(), causal_window(dec.head[2]), pre=_rms_silu(dec.head[0]), act=lambda t: t.clamp(-1.0, 1.0)))
    p.factor = float(model.downscale)
    return p


# ---------------------------------------------------------------- Flux.2


def flux2_encoder_program(model: Flux2Autoencoder) -> Program:
    """Image -> moments: the LDM encoder program with the encoder's own quant conv."""
    return sd_encoder_program(model.encoder, model.encoder.quant_conv)


def flux2_decoder_program(model: Flux2Autoencoder, frames: int = 1) -> Program:
    """Raw latent -> image: the decoder's own post-quant conv, then the LDM decoder program."""
    return sd_decoder_program(model.decoder, model.decoder.post_quant_conv, frames)


# ---------------------------------------------------------------- TAESD


def _relu(x: torch.Tensor) -> torch.Tensor:
    """ReLU in place: it always runs on a conv's fresh output."""
    return F.relu(x, inplace=True)


def _taesd_block(p: Program, m: Block, x: str) -> str:
    c0, _, c2, _, c4 = m.conv
    if isinstance(m.skip, nn.Conv2d):
        sc = p.slot()
        h = p.add(WindowOp(x, p.slot(), conv_window(c0), act=_relu, side=conv_window(m.skip), side_out=sc))
    else:
        sc, h = x, p.add(WindowOp(x, p.slot(), conv_window(c0), act=_relu))
    h = p.add(WindowOp(h, p.slot(), conv_window(c2), act=_relu))
    return p.add(WindowOp(h, p.slot(), conv_window(c4), residual=sc, act=_relu))


def _taesd_layers(p: Program, layers: nn.Sequential, x: str, pre: TensorFn | None) -> str:
    """The Sequential's layers as ops: `pre` (pointwise) goes into the first conv, an Upsample into the conv after it."""
    upsample = False
    for m in layers:
        if isinstance(m, Block):
            x = _taesd_block(p, m, x)
        elif isinstance(m, Clamp):  # pointwise: an op of its own, at latent resolution
            x = p.add(WindowOp(x, p.slot(), IDENTITY, pre=pre, act=m))
            pre = None
        elif isinstance(m, nn.ReLU):  # fused into the conv before it
            if not p.ops or not isinstance(p.ops[-1], WindowOp) or p.ops[-1].act is not None:
                raise TilingUnsupported("a TAESD ReLU must follow a conv")
            p.ops[-1] = replace(p.ops[-1], act=_relu)
        elif isinstance(m, nn.Upsample):
            if m.scale_factor not in (2, 2.0) or m.mode != "nearest":
                raise TilingUnsupported(f"TAESD upsample {m.scale_factor}x {m.mode} cannot be tiled")
            upsample = True
        elif type(m) is nn.Conv2d:
            window = _phase_up(m) if upsample else conv_window(m)
            x = p.add(WindowOp(x, p.slot(), window, upsample=upsample, pre=pre))
            upsample, pre = False, None
        else:
            raise TilingUnsupported(f"TAESD layer {type(m).__name__} cannot be tiled")
    return x


def _last_act(p: Program, act: TensorFn) -> None:
    last = p.ops[-1]
    if not isinstance(last, WindowOp) or last.act is not None:
        raise TilingUnsupported("a TAESD coder must end with a conv")
    p.ops[-1] = replace(last, act=act)


def taesd_encoder_program(model: TAESD) -> Program:
    """Image in [-1, 1] -> [raw mean, constant logvar], as `TAESD.encode_moments`."""
    fmt = model._format()

    def moments(t: torch.Tensor) -> torch.Tensor:
        raw = fmt.to_raw(t)  # [N, C, h, w]
        return torch.cat([raw, torch.full_like(raw, DETERMINISTIC_LOGVAR)], dim=1)  # [N, 2C, h, w]

    p = Program()
    _taesd_layers(p, model.encoder, p.input, lambda t: t.add(1).div(2))
    _last_act(p, moments)
    p.factor = 1 / model.downscale
    return p


def taesd_decoder_program(model: TAESD, frames: int = 1) -> Program:
    """Raw latent -> image in about [-1, 1], as `TAESD.decode`."""
    fmt = model._format()
    p = Program()
    _taesd_layers(p, model.decoder, p.input, fmt.to_scaled)
    _last_act(p, lambda t: t.mul(2).sub(1))
    p.factor = float(model.downscale)
    return p


PROGRAMS: dict[type, tuple[Callable[..., Program], Callable[..., Program]]] = {
    WanVAE: (wan_encoder_program, wan_decoder_program),
    Flux2Autoencoder: (flux2_encoder_program, flux2_decoder_program),
    TAESD: (taesd_encoder_program, taesd_decoder_program),
}


def coder_program(model: nn.Module, direction: str, frames: int = 1) -> Program:
    """The tile program of `model`'s encoder ("encode": encode_moments) or decoder ("decode": decode, `frames` per clip)."""
    builders = PROGRAMS.get(type(model))
    if direction == "encode":
        return encoder_program(model) if builders is None else builders[0](model)
    return decoder_program(model, frames) if builders is None else builders[1](model, frames)
