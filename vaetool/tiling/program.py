"""A VAE coder as a flat program of tileable ops, read off the model's modules (nothing is patched).

Every op is either a `WindowOp` (optional GroupNorm+SiLU or a pointwise `pre` function, optional
nearest x2 upsample, a conv-like
window function, optional residual / mix / activation: each output pixel depends on a small window
of its input, so it can be computed tile by tile from a halo) or a `GlobalOp` (an attention block,
run on the whole tensor). Activations are named slots; the executors in `vaetool.tiling.exact`
run a program tile by tile with GroupNorm statistics pooled over all tiles, or fixed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vaetool.nn.blocks import AttnBlock, Downsample, NoAttn, ResnetBlock, Upsample, is_plain_conv, upsample_conv_phases
from vaetool.nn.coders import Decoder, Encoder
from vaetool.nn.groupstats import Norm
from vaetool.nn.temporal import AE3DConv, Conv2DWrapper, VideoResBlock

TensorFn = Callable[[torch.Tensor], torch.Tensor]


class TilingUnsupported(TypeError):
    """A module the tiled executors do not know how to split into tiles."""


@dataclass(frozen=True)
class Window:
    """A conv-like function on a zero-padded window and its geometry along height and width."""

    fn: TensorFn  # [N, Cin, h, w] (already padded) -> [N, Cout, h', w']
    kernel: tuple[int, int]
    stride: tuple[int, int]
    pad_lo: tuple[int, int]
    pad_hi: tuple[int, int]
    phases: TensorFn | None = None  # fn(nearest_x2(x)) straight from x (see nn.blocks.upsample_conv_phases)

    def out_size(self, n: int, dim: int) -> int:
        """Output length along `dim` (0 rows, 1 columns) for an input of length `n`."""
        return (n + self.pad_lo[dim] + self.pad_hi[dim] - self.kernel[dim]) // self.stride[dim] + 1

    def in_range(self, a: int, b: int, dim: int) -> tuple[int, int]:
        """Input positions [lo, hi) (unclipped: may reach into the padding) read by outputs [a, b)."""
        lo = a * self.stride[dim] - self.pad_lo[dim]
        return lo, (b - 1) * self.stride[dim] - self.pad_lo[dim] + self.kernel[dim]


@dataclass(frozen=True)
class WindowOp:
    """out = act(mix(residual + window(upsample(silu(norm(src)))))), each part optional."""

    src: str
    out: str
    window: Window
    norm: Norm | None = None
    upsample: bool = False
    residual: str | None = None
    alpha: torch.Tensor | None = None  # out = alpha * (res + y) + (1 - alpha) * res (video res blocks)
    act: TensorFn | None = None
    side: Window | None = None  # also side_out = side(src), the raw source, in the same pass over the tiles
    side_out: str | None = None
    pre: TensorFn | None = None  # pointwise, on the source before the window's zero padding (e.g. RMS norm + SiLU)

    def inputs(self) -> tuple[str, ...]:
        """Slots this op reads."""
        return (self.src,) if self.residual is None else (self.src, self.residual)

    def outputs(self) -> tuple[str, ...]:
        """Slots this op writes."""
        return (self.out,) if self.side_out is None else (self.out, self.side_out)

    def out_size(self, n: int, dim: int) -> int:
        """Output length along `dim` for a source of length `n`."""
        return self.window.out_size(2 * n if self.upsample else n, dim)


@dataclass(frozen=True)
class GlobalOp:
    """An op that needs the whole tensor (attention): out = fn(src)."""

    src: str
    out: str
    fn: TensorFn

    def inputs(self) -> tuple[str, ...]:
        """Slots this op reads."""
        return (self.src,)

    def outputs(self) -> tuple[str, ...]:
        """Slots this op writes."""
        return (self.out,)


Op = WindowOp | GlobalOp


@dataclass
class Program:
    """Ops in execution order, from slot `input` to slot `output`; `frames` per clip for video ops."""

    ops: list[Op] = field(default_factory=list)
    input: str = "in"
    output: str = "in"
    frames: int = 1
    factor: float = 1.0  # output size / input size (8 for an f8 decoder, 1/8 for its encoder)
    _count: int = 0

    def slot(self) -> str:
        """A fresh slot name."""
        self._count += 1
        return f"s{self._count}"

    def add(self, op: Op) -> str:
        """Append `op`; returns its output slot."""
        self.ops.append(op)
        self.output = op.out
        return op.out

    def last_use(self) -> dict[str, int]:
        """Index of the last op reading each slot (the output slot is never freed)."""
        last: dict[str, int] = {}
        for i, op in enumerate(self.ops):
            for s in op.inputs():
                last[s] = i
        last.pop(self.output, None)
        return last

    def split(self, at: int) -> tuple[Program, Program]:
        """(ops[:at], ops[at:]) as two programs (either may be empty); only the head's output crosses the cut."""
        head = Program(self.ops[:at], self.input, self.ops[at - 1].out if at > 0 else self.input, self.frames)
        tail = Program(self.ops[at:], head.output, self.output, self.frames)
        head_slots = {self.input} | {s for op in head.ops for s in op.outputs()}
        crossing = {s for op in tail.ops for s in op.inputs() if s in head_slots}
        if crossing != {head.output}:
            raise TilingUnsupported(f"cannot cut the program at op {at}: slots {sorted(crossing)} cross it")
        head.factor, tail.factor = _factor(head.ops), _factor(tail.ops)
        return head, tail

    def normalized(self) -> dict[str, Norm]:
        """Slots some op GroupNorms, with one of their norms (all norms of a slot share statistics)."""
        return {op.src: op.norm for op in self.ops if isinstance(op, WindowOp) and op.norm is not None}


def _factor(ops: list[Op]) -> float:
    """Output size / input size of a run of ops (from their upsamples and strides)."""
    f = 1.0
    for op in ops:
        if isinstance(op, WindowOp):
            f *= (2 if op.upsample else 1) / op.window.stride[0]
    return f


def conv_window(m: nn.Conv2d) -> Window:
    """A Conv2d (any kernel, stride, dilation, groups; zero padding) as a Window."""
    if m.padding_mode != "zeros" or isinstance(m.padding, str):
        raise TilingUnsupported(f"conv with padding {m.padding!r} / mode {m.padding_mode!r} cannot be tiled")
    kernel = tuple(d * (k - 1) + 1 for k, d in zip(m.kernel_size, m.dilation, strict=False))

    def fn(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, m.weight, m.bias, m.stride, 0, m.dilation, m.groups)

    return Window(fn, kernel, tuple(m.stride), tuple(m.padding), tuple(m.padding))  # type: ignore[arg-type]


def conv3d_window(m: nn.Conv3d, frames: int) -> Window:
    """A Conv3d over [B, C, T, H, W] applied to frames flattened in the batch, [B*T, C, H, W]."""
    if m.stride[0] != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str):
        raise TilingUnsupported("a temporal conv with a time stride or non-zero padding cannot be tiled")
    kernel = tuple(d * (k - 1) + 1 for k, d in zip(m.kernel_size[1:], m.dilation[1:], strict=False))

    def fn(x: torch.Tensor) -> torch.Tensor:
        v = rearrange(x, "(b t) c h w -> b c t h w", t=frames)
        y = F.conv3d(v, m.weight, m.bias, m.stride, (m.padding[0], 0, 0), m.dilation, m.groups)
        return rearrange(y, "b c t h w -> (b t) c h w")

    return Window(fn, kernel, tuple(m.stride[1:]), tuple(m.padding[1:]), tuple(m.padding[1:]))  # type: ignore[arg-type]


IDENTITY = Window(lambda x: x, (1, 1), (1, 1), (0, 0), (0, 0))


def _norm(m: nn.GroupNorm, per_clip: bool = False) -> Norm:
    if not m.affine:
        raise TilingUnsupported("GroupNorm without affine parameters is not supported")
    return Norm(m.weight, m.bias, m.num_groups, float(m.eps), per_clip)


def _resnet(p: Program, m: ResnetBlock, x: str) -> str:
    """norm1-silu-conv1, then norm2-silu-conv2 + shortcut(x); a VideoResBlock adds its time stack.

    A shortcut conv runs in conv1's pass (a side output), so x is freed there, not kept for conv2.
    """
    if m.in_channels != m.out_channels:
        sc = p.slot()
        h = p.add(WindowOp(x, p.slot(), conv_window(m.conv1), _norm(m.norm1), side_out=sc,
                           side=conv_window(m.conv_shortcut if m.use_conv_shortcut else m.nin_shortcut)))
        out = p.add(WindowOp(h, p.slot(), conv_window(m.conv2), _norm(m.norm2), residual=sc))
    else:
        h = p.add(WindowOp(x, p.slot(), conv_window(m.conv1), _norm(m.norm1)))
        out = p.add(WindowOp(h, p.slot(), conv_window(m.conv2), _norm(m.norm2), residual=x))
    if not isinstance(m, VideoResBlock):
        return out
    stack = m.time_stack
    t1 = p.add(WindowOp(out, p.slot(), conv3d_window(stack.in_layers[2], p.frames), _norm(stack.in_layers[0], True)))
    alpha = m.get_alpha().detach()
    return p.add(
        WindowOp(t1, p.slot(), conv3d_window(stack.out_layers[3], p.frames), _norm(stack.out_layers[0], True),
                 residual=out, alpha=alpha)
    )


def _attn(p: Program, m: nn.Module, x: str) -> str:
    """A spatial (or spatio-temporal) attention block runs whole; `attn_type: none` is skipped."""
    if isinstance(m, NoAttn):
        return x
    if not isinstance(m, AttnBlock):
        raise TilingUnsupported(f"attention block {type(m).__name__} cannot be tiled")
    frames = p.frames

    def fn(t: torch.Tensor) -> torch.Tensor:
        return m(t, timesteps=frames)

    return p.add(GlobalOp(x, p.slot(), fn))


def _block(p: Program, m: nn.Module, x: str) -> str:
    """Dispatch one module of a coder level by type."""
    if isinstance(m, ResnetBlock):
        if type(m).forward not in (ResnetBlock.forward, VideoResBlock.forward):  # a custom resnet_op
            raise TilingUnsupported(f"res block {type(m).__name__} has its own forward and cannot be tiled")
        return _resnet(p, m, x)
    if isinstance(m, Upsample):
        window = conv_window(m.conv) if m.with_conv else IDENTITY
        if m.with_conv and is_plain_conv(m.conv, (3,)):
            conv = m.conv
            window = replace(window, phases=lambda t: upsample_conv_phases(t, conv))
        return p.add(WindowOp(x, p.slot(), window, upsample=True))
    if isinstance(m, Downsample):
        if m.with_conv:  # pad right/bottom by one, then a stride-2 conv without padding
            w = conv_window(m.conv)
            return p.add(WindowOp(x, p.slot(), Window(w.fn, w.kernel, w.stride, (0, 0), (1, 1))))
        pool = Window(lambda t: F.avg_pool2d(t, 2, 2), (2, 2), (2, 2), (0, 0), (0, 0))
        return p.add(WindowOp(x, p.slot(), pool))
    return _attn(p, m, x)


def encoder_program(model: nn.Module) -> Program:
    """The program of an LDM model's `encode_moments`: image [B, 3, H, W] -> moments [B, 2z, H/f, W/f].

    The other families' programs: vaetool.tiling.archs (`coder_program` picks).
    """
    if type(model.encoder) is not Encoder:
        raise TilingUnsupported(f"encoder {type(model.encoder).__name__} cannot be tiled")
    return sd_encoder_program(model.encoder, getattr(model, "quant_conv", None))


def sd_encoder_program(enc: Encoder, quant_conv: nn.Module | None) -> Program:
    """The program of an LDM Encoder followed by an optional 1x1 quant conv."""
    p = Program()
    x = p.add(WindowOp(p.input, p.slot(), conv_window(enc.conv_in)))
    for i_level, down in enumerate(enc.down):
        for i_block in range(enc.num_res_blocks):
            x = _block(p, down.block[i_block], x)
            if len(down.attn) > 0:
                x = _block(p, down.attn[i_block], x)
        if i_level != enc.num_resolutions - 1:
            x = _block(p, down.downsample, x)
    for m in (enc.mid.block_1, enc.mid.attn_1, enc.mid.block_2):
        x = _block(p, m, x)
    x = p.add(WindowOp(x, p.slot(), conv_window(enc.conv_out), _norm(enc.norm_out)))
    if quant_conv is not None:
        x = p.add(WindowOp(x, p.slot(), conv_window(quant_conv)))
    p.factor = _factor(p.ops)
    return p


def decoder_program(model: nn.Module, frames: int = 1) -> Program:
    """The program of an LDM model's `decode`: latent [B*T, z, h, w] -> image [B*T, 3, h*f, w*f]."""
    if not isinstance(model.decoder, Decoder):
        raise TilingUnsupported(f"decoder {type(model.decoder).__name__} cannot be tiled")
    return sd_decoder_program(model.decoder, getattr(model, "post_quant_conv", None), frames)


def sd_decoder_program(dec: Decoder, post_quant_conv: nn.Module | None, frames: int = 1) -> Program:
    """The program of an optional 1x1 post-quant conv followed by an LDM Decoder (or its video variant)."""
    p = Program(frames=frames)
    x = p.input
    if post_quant_conv is not None:
        x = p.add(WindowOp(x, p.slot(), conv_window(post_quant_conv)))
    x = p.add(WindowOp(x, p.slot(), conv_window(dec.conv_in)))
    for m in (dec.mid.block_1, dec.mid.attn_1, dec.mid.block_2):
        x = _block(p, m, x)
    for i_level in reversed(range(dec.num_resolutions)):
        up = dec.up[i_level]
        for i_block in range(dec.num_res_blocks + 1):
            x = _block(p, up.block[i_block], x)
            if len(up.attn) > 0:
                x = _block(p, up.attn[i_block], x)
        if i_level != 0:
            x = _block(p, up.upsample, x)
    p.factor = _factor(p.ops)
    if dec.give_pre_end:
        return p
    act = torch.tanh if dec.tanh_out else None
    conv_out = dec.conv_out
    if type(conv_out).forward not in (nn.Conv2d.forward, Conv2DWrapper.forward, AE3DConv.forward):  # a custom conv_out_op
        raise TilingUnsupported(f"output conv {type(conv_out).__name__} cannot be tiled")
    if isinstance(conv_out, AE3DConv):  # Conv2d, then a Conv3d across frames of its output
        x = p.add(WindowOp(x, p.slot(), conv_window(conv_out), _norm(dec.norm_out)))
        p.add(WindowOp(x, p.slot(), conv3d_window(conv_out.time_mix_conv, frames), act=act))
    else:
        p.add(WindowOp(x, p.slot(), conv_window(conv_out), _norm(dec.norm_out), act=act))
    return p
