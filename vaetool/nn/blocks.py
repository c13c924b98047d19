"""The VAE's building blocks: normalisation, resampling, residual and attention blocks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vaetool.nn import banded
from vaetool.nn.attention import attention


def get_timestep_embedding(timesteps: torch.Tensor, embedding_dim: int) -> torch.Tensor:
    """Sinusoidal embeddings of 1-D `timesteps`: [N] -> [N, embedding_dim] (sin half, then cos half)."""
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be 1-D, got shape {tuple(timesteps.shape)}")
    half = embedding_dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / (half - 1))
    args = timesteps.float()[:, None] * freqs[None, :]  # [N, half]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # [N, 2*half]
    if embedding_dim % 2 == 1:
        emb = F.pad(emb, (0, 1, 0, 0))
    return emb


def nonlinearity(x: torch.Tensor) -> torch.Tensor:
    """Swish: x * sigmoid(x)."""
    return F.silu(x)


def norm_silu(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """swish(norm(x)); without autograd the swish overwrites the fresh norm output (one full-size buffer less)."""
    return F.silu(norm(x), inplace=not torch.is_grad_enabled())


def norm_silu_conv(norm: nn.Module, conv: nn.Module, x: torch.Tensor, **kwargs: object) -> torch.Tensor:
    """conv(swish(norm(x)), **kwargs): row-banded (vaetool.nn.banded) for large inference activations of plain convs, else plainly."""
    if not kwargs and isinstance(norm, nn.GroupNorm) and is_plain_conv(conv) and banded.applies(x, conv):
        return banded.norm_silu_conv(norm, conv, x)
    return conv(norm_silu(norm, x), **kwargs)


def Normalize(in_channels: int, num_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with 32 groups and eps 1e-6, the VAE's normalisation everywhere."""
    return nn.GroupNorm(num_groups=num_groups, num_channels=in_channels, eps=1e-6, affine=True)


def set_norm_groups(module: nn.Module, groups: int) -> None:
    """Give every GroupNorm in `module` `groups` groups (SD uses 32; diffusers calls it norm_num_groups)."""
    for m in module.modules():
        if isinstance(m, nn.GroupNorm):
            if groups < 1 or m.num_channels % groups:
                raise ValueError(f"norm_groups {groups} does not divide a GroupNorm's {m.num_channels} channels")
            m.num_groups = groups


class Upsample(nn.Module):
    """Nearest-neighbour x2, then an optional 3x3 conv."""

    def __init__(self, in_channels: int, with_conv: bool) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv and not torch.is_grad_enabled() and is_plain_conv(self.conv, (3,)):
            return upsample_conv_phases(x, self.conv)
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # [B, C, 2H, 2W]
        return self.conv(x) if self.with_conv else x


def is_plain_conv(conv: nn.Module, sizes: tuple[int, ...] = (1, 3)) -> bool:
    """A plain nn.Conv2d (no subclass forward) of a square kernel in `sizes`, stride 1, 'same' zero padding, no groups.

    What the row bands (1x1 and 3x3) and the phase upsample (3x3 only) compute from its weights directly.
    """
    return (
        type(conv) is nn.Conv2d
        and conv.kernel_size in [(k, k) for k in sizes]
        and conv.padding == ((conv.kernel_size[0] - 1) // 2,) * 2
        and (conv.stride, conv.dilation, conv.groups, conv.padding_mode) == ((1, 1), (1, 1), 1, "zeros")
    )


# Nearest x2 then a 3x3 conv, seen from one output phase (row parity a): the three taps land on
# input rows (i-1, i, i) for a = 0 and (i, i, i+1) for a = 1, so each phase is a 2x2 conv of the
# input with taps summed; [first tap row, second] per parity, as index lists into the 3 kernel rows.
_PHASE_TAPS = (((0,), (1, 2)), ((0, 1), (2,)))


def phase_kernels(conv: nn.Conv2d) -> list[tuple[int, int, torch.Tensor]]:
    """The four 2x2 kernels (row parity, column parity, [Cout, Cin, 2, 2]) of nearest x2 then `conv`."""
    w = conv.weight  # [Cout, Cin, 3, 3]
    kernels = []
    for a, rows in enumerate(_PHASE_TAPS):
        wr = torch.stack([w[:, :, list(t)].sum(2) for t in rows], dim=2)  # [Cout, Cin, 2, 3]
        for c, cols in enumerate(_PHASE_TAPS):
            kernels.append((a, c, torch.stack([wr[..., list(t)].sum(-1) for t in cols], dim=-1)))  # [Cout, Cin, 2, 2]
    return kernels


def upsample_conv_phases(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """conv(nearest_x2(x)) as four 2x2 convs on x, one per output phase: 4/9 of the work, no 4x buffer.

    Large inference inputs on the CPU go a band of rows at a time (vaetool.nn.banded): small
    zero-bordered copies instead of one padded copy of the whole input.
    """
    h, wd = x.shape[2:]
    kernels = phase_kernels(conv)
    out = banded.new_output(x, conv.out_channels, scale=2)  # [B, Cout, 2H, 2W]
    band = banded.applies(x, conv, factor=4)
    for images in banded.image_groups(x) if band else [slice(None)]:
        xi = x[images]
        rows = banded.band_rows(xi) if band else h
        for r0 in range(0, h, rows):
            r1 = min(r0 + rows, h)
            lo, hi = max(r0 - 1, 0), min(r1 + 1, h)
            xb = F.pad(xi[:, :, lo:hi], (1, 1, 1 - (r0 - lo), 1 - (hi - r1)))  # [b, Cin, r1-r0+2, W+2]: rows r0-1..r1, zeros outside
            for a, c, k in kernels:
                y = F.conv2d(xb[:, :, a : a + r1 - r0 + 1, c : c + wd + 1], k, conv.bias)  # [b, Cout, r1-r0, W]
                out[images, :, 2 * r0 + a : 2 * r1 : 2, c::2] = y
    return out


class Downsample(nn.Module):
    """x1/2: a stride-2 3x3 conv on the input padded right/bottom by one, or 2x2 average pooling."""

    def __init__(self, in_channels: int, with_conv: bool) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            x = F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0)  # [B, C, H+1, W+1]
            return self.conv(x)  # [B, C, floor(H/2), floor(W/2)]
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class ResnetBlock(nn.Module):
    """norm-swish-conv twice with an optional timestep projection, plus a (1x1 or 3x3) shortcut."""

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int | None = None,
        conv_shortcut: bool = False,
        dropout: float = 0.0,
        temb_channels: int = 512,
    ) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.use_conv_shortcut = conv_shortcut
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if temb_channels > 0:
            self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
            else:
                self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        """The skip path: identity when channels match, else the shortcut conv."""
        if self.in_channels == self.out_channels:
            return x
        return self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)

    def bandable(self) -> bool:
        """Whether the block's structure allows vaetool.nn.banded's path: plain convs, no 3x3 shortcut."""
        convs_plain = all(is_plain_conv(c) for c in (self.conv1, self.conv2))
        return convs_plain and (self.in_channels == self.out_channels or not self.use_conv_shortcut)

    def runs_banded(self, x: torch.Tensor, temb: torch.Tensor | None) -> bool:
        """Whether this forward takes vaetool.nn.banded's path (same result, a band of rows at a time)."""
        return temb is None and banded.applies(x, self) and self.bandable()

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None, **kwargs: object) -> torch.Tensor:
        if self.runs_banded(x, temb):
            return banded.resnet_forward(self.norm1, self.conv1, self.norm2, self.conv2, x, self.shortcut)
        h = self.conv1(norm_silu(self.norm1, x))  # [B, Cout, H, W]
        if temb is not None:
            h = h + self.temb_proj(nonlinearity(temb))[:, :, None, None]
        h = self.conv2(self.dropout(norm_silu(self.norm2, h)))  # [B, Cout, H, W]
        if torch.is_grad_enabled():
            return self.shortcut(x) + h
        return h.add_(self.shortcut(x))  # in place on conv2's fresh output: no extra full-size buffer


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections and a residual."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.norm = Normalize(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise, project and attend over all positions; returns [B, C, H, W] before proj_out."""
        h = self.norm(x)
        b, c, hh, ww = h.shape
        q, k, v = (t.reshape(b, 1, c, hh * ww).transpose(-1, -2) for t in (self.q(h), self.k(h), self.v(h)))  # [B, 1, HW, C]
        out = attention(q, k, v)  # [B, 1, HW, C]
        return out.transpose(-1, -2).reshape(b, c, hh, ww)

    def forward(self, x: torch.Tensor, **kwargs: object) -> torch.Tensor:
        return x + self.proj_out(self.attention(x))


class NoAttn(nn.Module):
    """The `attn_type: none` block: passes its input through (extra keyword arguments ignored)."""

    def forward(self, x: torch.Tensor, **kwargs: object) -> torch.Tensor:
        return x


# attn_type -> block. "linear" (and use_linear_attn) builds the vanilla block, as the seeds' make_attn
# does; weights of CompVis ldm's LinAttnBlock (to_qkv, to_out) do not load into it (a strict-load error).
ATTN_TYPES: dict[str, type[nn.Module]] = {
    "vanilla": AttnBlock,
    "vanilla-xformers": AttnBlock,
    "memory-efficient-cross-attn": AttnBlock,
    "linear": AttnBlock,
    "none": NoAttn,
}


def make_attn(in_channels: int, attn_type: str = "vanilla", attn_kwargs: dict | None = None) -> nn.Module:
    """Build the attention block named by `attn_type` (the backend is chosen at call time, not here)."""
    if attn_type not in ATTN_TYPES:
        raise ValueError(f"attn_type {attn_type!r} is not supported; choose one of {', '.join(ATTN_TYPES)}")
    cls = ATTN_TYPES[attn_type]
    return NoAttn() if cls is NoAttn else cls(in_channels)
