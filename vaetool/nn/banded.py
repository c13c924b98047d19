"""Row-banded inference of norm-swish-conv: the untiled result, a band of rows at a time.

`conv(silu(groupnorm(x)))` the plain way makes two full-size tensors besides the conv's output
(the normalised copy and the conv's input reorder), and on a CPU every fresh full-size tensor is a
new mmap whose pages fault in (~20 % of a 512 px fp32 decode went to system time). Here the
GroupNorm statistics are pooled over the whole tensor first (vaetool.nn.groupstats), then each
band of rows is normalised into a small zero-bordered buffer and convolved: buffers of a few MiB,
which the allocator reuses. A residual block's second conv writes its output over its own input
(the band's halo row is kept aside first), so a block holds its input, one activation and bands.

Inference only (no autograd), on the CPU, for activations of at least `MIN_BYTES`; an NHWC batch
goes one image at a time (its rows are contiguous per image). The result equals the plain forward
up to float rounding (tests/test_banded.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vaetool.nn.groupstats import Norm, Stats, accumulate

BAND_BYTES = 8 << 20  # a band's normalised input buffer, about
MIN_BYTES = 48 << 20  # smaller activations take the plain path (fewer, larger kernels win there)
DEVICES = frozenset({"cpu"})  # measured here; a GPU's caching allocator has no page faults to save

Residual = Callable[[int, int], torch.Tensor]  # rows [r0, r1) of what is added to the conv's output


def applies(x: torch.Tensor, module: nn.Module, factor: int = 1) -> bool:
    """Whether `module`'s forward on `x` should run banded: inference, CPU, a large activation.

    `factor`: the output is that many times the input's size (the upsample).
    """
    return (
        not torch.is_grad_enabled()
        and not module.training
        and x.ndim == 4
        and bands(x.numel() * x.element_size() * factor, x.device.type)
    )


def bands(nbytes: float, device_type: str) -> bool:
    """The size and device part of `applies`, for callers that know only shapes (the memory estimate)."""
    return device_type in DEVICES and nbytes >= MIN_BYTES


def band_batch(batch: int, nhwc: bool) -> int:
    """Images in one band: all of an NCHW batch; one of an NHWC batch, whose images are banded one at a time.

    Rows of an NHWC batch are not contiguous across its images: such bands measured 1.7x slower
    (bf16 encode, batch 4); one image's rows are contiguous.
    """
    return 1 if nhwc else batch


def per_image(x: torch.Tensor) -> bool:
    """An NHWC batch of more than one image: banded image by image (band_batch)."""
    return x.shape[0] > 1 and memory_format(x) == torch.channels_last


def image_groups(x: torch.Tensor) -> list[slice]:
    """The images banded together: each image of an NHWC batch alone, else the whole batch."""
    return [slice(i, i + 1) for i in range(x.shape[0])] if per_image(x) else [slice(None)]


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last for an NHWC tensor (CPU bf16 runs so), else the plain layout: new buffers follow the input."""
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() else torch.contiguous_format


def band_rows(x: torch.Tensor) -> int:
    """Rows per band for `x` [B, C, H, W]: about BAND_BYTES of input each."""
    b, c, _, w = x.shape
    return max(4, BAND_BYTES // max(1, b * c * (w + 2) * x.element_size()))


def group_affine(norm: nn.GroupNorm, x: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm of the whole `x` as y = x * a + b, a and b [B, C, 1, 1], statistics pooled band by band."""
    stats: Stats | None = None
    for r0 in range(0, x.shape[2], rows):
        stats = accumulate(stats, x[:, :, r0 : r0 + rows])
    if stats is None:
        raise ValueError("group_affine of an empty tensor")
    a, b = stats.scale_shift(Norm(norm.weight, norm.bias, norm.num_groups, float(norm.eps)), 1)
    return a.to(x.dtype), b.to(x.dtype)


def new_output(x: torch.Tensor, channels: int, scale: int = 1) -> torch.Tensor:
    """An uninitialised [B, channels, scale * H, scale * W] in `x`'s dtype, device and layout."""
    b, _, h, w = x.shape
    return torch.empty(b, channels, scale * h, scale * w, dtype=x.dtype, device=x.device, memory_format=memory_format(x))


def norm_silu_conv(
    norm: nn.GroupNorm, conv: nn.Conv2d, x: torch.Tensor, *, residual: Residual | None = None, in_place: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """conv(silu(norm(x))) [+ residual rows], band by band, into `out` (new if None); `in_place` writes over `x`.

    An NHWC batch goes image by image (per_image); a `residual` is given for one image at a time.
    """
    out = x if in_place else new_output(x, conv.out_channels) if out is None else out  # [B, Cout, H, W]
    if per_image(x):
        if residual is not None:
            raise ValueError("norm_silu_conv: a residual is given per image; call it image by image")
        for images in image_groups(x):
            norm_silu_conv(norm, conv, x[images], in_place=in_place, out=out[images])
        return out
    b, c, h, w = x.shape
    p = conv.padding[0]
    rows = band_rows(x)
    scale, shift = group_affine(norm, x, rows)
    fmt = memory_format(x)
    carry: torch.Tensor | None = None  # row r0 - 1 normalised (before the swish), kept before the previous band overwrote it
    for r0 in range(0, h, rows):
        r1 = min(r0 + rows, h)
        buf = torch.empty(b, c, r1 - r0 + 2 * p, w + 2 * p, dtype=x.dtype, device=x.device, memory_format=fmt)  # [B, C, rows+2p, W+2p]
        if p:
            buf[..., :1].zero_(), buf[..., -1:].zero_()
            top = buf[:, :, :1, p : p + w]
            if r0 == 0:
                top.zero_()
            elif carry is not None:
                top.copy_(carry)
            else:
                torch.addcmul(shift, x[:, :, r0 - 1 : r0], scale, out=top)
            if r1 == h:
                buf[:, :, -1:, p : p + w].zero_()
            else:
                torch.addcmul(shift, x[:, :, r1 : r1 + 1], scale, out=buf[:, :, -1:, p : p + w])
        torch.addcmul(shift, x[:, :, r0:r1], scale, out=buf[:, :, p : p + r1 - r0, p : p + w])
        if in_place and p:
            carry = buf[:, :, r1 - r0 : r1 - r0 + 1, p : p + w].clone()  # [B, C, 1, W]: row r1 - 1, normalised
        F.silu(buf, inplace=True)  # silu(0) = 0 keeps the border
        y = F.conv2d(buf, conv.weight, conv.bias)  # [B, Cout, r1 - r0, W]
        if residual is not None:
            y.add_(residual(r0, r1))
        out[:, :, r0:r1] = y
    return out


def resnet_forward(norm1: nn.GroupNorm, conv1: nn.Conv2d, norm2: nn.GroupNorm, conv2: nn.Conv2d, x: torch.Tensor,
                   shortcut: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:  # fmt: skip
    """x + conv2(silu(norm2(conv1(silu(norm1(x)))))) with a per-pixel `shortcut` on x, banded; x is left as it was."""
    out = new_output(x, conv2.out_channels)  # [B, Cout, H, W]
    for images in image_groups(x):
        xi = x[images]
        h = norm_silu_conv(norm1, conv1, xi, out=out[images])  # conv1's output, then conv2's over it
        norm_silu_conv(norm2, conv2, h, residual=lambda r0, r1, xi=xi: shortcut(xi[:, :, r0:r1]), in_place=True)
    return out
