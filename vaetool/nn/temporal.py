"""The Stable Video Diffusion temporal decoder (sgm `temporal_ae`): video blocks and VideoDecoder.

Frames travel flattened into the batch, [B*T, C, H, W]; each temporal block unflattens them to
[B, C, T, H, W] (or [B*H*W, T, C] for attention) using `timesteps` = T, which defaults to the whole
batch (one clip). Parameter names match sgm checkpoints (`time_stack.in_layers.2`, `mix_factor`,
`conv_out.time_mix_conv`, ...).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
from einops import rearrange
from torch import nn
from torch.nn import functional as F

from vaetool.nn.blending import mix_alpha, register_mix_factor
from vaetool.nn.blocks import AttnBlock, ResnetBlock
from vaetool.nn.coders import Decoder
from vaetool.nn.transformer import BasicTransformerBlock, timestep_embedding

VIDEO_MERGE_STRATEGIES: tuple[str, ...] = ("fixed", "learned")
KernelSize = int | Iterable[int]


def partialclass(cls: type, *args: Any, **kwargs: Any) -> type:
    """A subclass of `cls` whose constructor has `args` / `kwargs` already bound."""

    class NewCls(cls):  # type: ignore[misc, valid-type]
        __init__ = functools.partialmethod(cls.__init__, *args, **kwargs)

    NewCls.__name__ = NewCls.__qualname__ = cls.__name__
    return NewCls


def _frames(n: int, timesteps: int | None) -> int:
    """Validated number of frames per clip for a batch of `n` flattened frames (default: all of them)."""
    t = n if timesteps is None else int(timesteps)
    if t <= 0 or n % t != 0:
        raise ValueError(f"a batch of {n} frames cannot be split into clips of timesteps={t} frames")
    return t


def _kernel3d(size: KernelSize) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Conv3d kernel size and 'same' padding from an int or a (t, h, w) sequence."""
    k = (int(size),) * 3 if isinstance(size, int) else tuple(int(s) for s in size)
    if len(k) != 3:
        raise ValueError(f"video_kernel_size must be an int or 3 ints (t, h, w), got {size!r}")
    return k, tuple(s // 2 for s in k)  # type: ignore[return-value]


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 (half-precision weights too) and cast back to the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


class TemporalResBlock(nn.Module):
    """x + out_layers(in_layers(x)) with Conv3d over [B, C, T, H, W] (sgm ResBlock, dims=3, no emb)."""

    def __init__(self, channels: int, dropout: float = 0.0, kernel_size: KernelSize = (3, 1, 1)) -> None:
        super().__init__()
        k, pad = _kernel3d(kernel_size)
        self.in_layers = nn.Sequential(
            GroupNorm32(32, channels, eps=1e-5), nn.SiLU(), nn.Conv3d(channels, channels, k, padding=pad)
        )
        self.out_layers = nn.Sequential(
            GroupNorm32(32, channels, eps=1e-5), nn.SiLU(), nn.Dropout(dropout),
            nn.Conv3d(channels, channels, k, padding=pad),
        )
        nn.init.zeros_(self.out_layers[3].weight)  # zero-initialised like upstream's zero_module
        nn.init.zeros_(self.out_layers[3].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.out_layers(self.in_layers(x))  # [B, C, T, H, W]


class VideoResBlock(ResnetBlock):
    """A spatial ResnetBlock followed by a temporal `time_stack`, merged by `mix_factor`.

    out = alpha * temporal + (1 - alpha) * spatial, alpha = sigmoid(mix_factor) ("learned") or
    mix_factor ("fixed"); this is the upstream sgm order and matches diffusers' SpatioTemporalResBlock.
    """

    def __init__(
        self,
        out_channels: int,
        *args: Any,
        dropout: float = 0.0,
        video_kernel_size: KernelSize | None = 3,
        alpha: float = 0.0,
        merge_strategy: str = "learned",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, out_channels=out_channels, dropout=dropout, **kwargs)
        video_kernel_size = (3, 1, 1) if video_kernel_size is None else video_kernel_size
        self.time_stack = TemporalResBlock(self.out_channels, dropout=dropout, kernel_size=video_kernel_size)
        self.merge_strategy = merge_strategy
        register_mix_factor(self, alpha, merge_strategy, VIDEO_MERGE_STRATEGIES)

    def get_alpha(self) -> torch.Tensor:
        """The weight [1] of the temporal branch."""
        return mix_alpha(self.mix_factor, self.merge_strategy)

    def forward(
        self,
        x: torch.Tensor,
        temb: torch.Tensor | None = None,
        skip_video: bool = False,
        timesteps: int | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        """x [B*T, Cin, H, W] -> [B*T, Cout, H, W]."""
        t = _frames(x.shape[0], timesteps)
        x = super().forward(x, temb)  # [B*T, C, H, W]
        if skip_video:
            return x
        x_spatial = rearrange(x, "(b t) c h w -> b c t h w", t=t)
        x_temporal = self.time_stack(x_spatial)  # [B, C, T, H, W]
        alpha = self.get_alpha().to(x.dtype)
        x = alpha * x_temporal + (1.0 - alpha) * x_spatial
        return rearrange(x, "b c t h w -> (b t) c h w")


class AE3DConv(nn.Conv2d):
    """A Conv2d followed by `time_mix_conv`, a Conv3d across frames of its output."""

    def __init__(
        self, in_channels: int, out_channels: int, video_kernel_size: KernelSize = 3, *args: Any, **kwargs: Any
    ) -> None:
        super().__init__(in_channels, out_channels, *args, **kwargs)
        k, pad = _kernel3d(video_kernel_size)
        self.time_mix_conv = nn.Conv3d(out_channels, out_channels, kernel_size=k, padding=pad)

    def forward(  # type: ignore[override]
        self, input: torch.Tensor, timesteps: int | None = None, skip_video: bool = False, **kwargs: object
    ) -> torch.Tensor:
        """input [B*T, Cin, H, W] -> [B*T, Cout, H, W]."""
        t = _frames(input.shape[0], timesteps)
        x = super().forward(input)
        if skip_video:
            return x
        x = rearrange(x, "(b t) c h w -> b c t h w", t=t)
        return rearrange(self.time_mix_conv(x), "b c t h w -> (b t) c h w")


class AttnVideoBlock(AttnBlock):
    """Spatial AttnBlock plus attention across frames at every spatial position, merged by `mix_factor`.

    out = x + proj_out(alpha * spatial + (1 - alpha) * temporal) (sgm order: here alpha weights the
    spatial branch); the temporal branch adds a learned embedding of the frame index first.
    """

    def __init__(self, in_channels: int, alpha: float = 0.0, merge_strategy: str = "learned") -> None:
        super().__init__(in_channels)
        self.time_mix_block = BasicTransformerBlock(
            dim=in_channels, n_heads=1, d_head=in_channels, checkpoint=False, ff_in=True
        )
        self.video_time_embed = nn.Sequential(
            nn.Linear(in_channels, 4 * in_channels), nn.SiLU(), nn.Linear(4 * in_channels, in_channels)
        )
        self.merge_strategy = merge_strategy
        register_mix_factor(self, alpha, merge_strategy, VIDEO_MERGE_STRATEGIES)

    def get_alpha(self) -> torch.Tensor:
        """The weight [1] of the spatial branch."""
        return mix_alpha(self.mix_factor, self.merge_strategy)

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, timesteps: int | None = None, skip_time_block: bool = False, **kwargs: object
    ) -> torch.Tensor:
        """x [B*T, C, H, W] -> [B*T, C, H, W]."""
        if skip_time_block:
            return super().forward(x)
        t = _frames(x.shape[0], timesteps)
        x_in = x
        h = self.attention(x)  # [B*T, C, H, W]
        hh, ww = h.shape[2:]
        spatial = rearrange(h, "bt c h w -> bt (h w) c")
        frame_idx = torch.arange(t, device=x.device).repeat(x.shape[0] // t)  # [B*T]: 0..T-1 per clip
        emb = self.video_time_embed(timestep_embedding(frame_idx, self.in_channels).to(h.dtype))  # [B*T, C]
        temporal = rearrange(spatial + emb[:, None, :], "(b t) s c -> (b s) t c", t=t)
        temporal = self.time_mix_block(temporal)  # [B*HW, T, C]
        temporal = rearrange(temporal, "(b s) t c -> (b t) s c", s=hh * ww)
        alpha = self.get_alpha().to(h.dtype)
        out = alpha * spatial + (1.0 - alpha) * temporal
        out = rearrange(out, "bt (h w) c -> bt c h w", h=hh, w=ww)
        return x_in + self.proj_out(out)


def make_time_attn(
    in_channels: int,
    attn_type: str = "vanilla",
    attn_kwargs: dict | None = None,
    alpha: float = 0.0,
    merge_strategy: str = "learned",
) -> AttnVideoBlock:
    """Build a spatio-temporal attention block (every vanilla attn_type maps to AttnVideoBlock)."""
    if attn_type not in ("vanilla", "vanilla-xformers"):
        raise ValueError(f"attn_type {attn_type!r} is not supported for spatio-temporal attention; use 'vanilla'")
    return AttnVideoBlock(in_channels, alpha=alpha, merge_strategy=merge_strategy)


class Conv2DWrapper(nn.Conv2d):
    """A Conv2d whose forward accepts (and ignores) the video keyword arguments."""

    def forward(self, input: torch.Tensor, **kwargs: object) -> torch.Tensor:  # type: ignore[override]
        return super().forward(input)


class TemporalParts(NamedTuple):
    """Which decoder parts get a temporal component in a time mode."""

    res: bool
    attn: bool
    conv: bool


TIME_MODES: dict[str, TemporalParts] = {
    "all": TemporalParts(res=True, attn=True, conv=True),
    "conv-only": TemporalParts(res=True, attn=False, conv=True),
    "attn-only": TemporalParts(res=False, attn=True, conv=False),
    "only-last-conv": TemporalParts(res=False, attn=False, conv=True),
}


class VideoDecoder(Decoder):
    """The Decoder with temporal res blocks / attention / output conv as `time_mode` selects.

    "conv-only" (the SVD default) makes every res block a VideoResBlock and conv_out an AE3DConv;
    "all" adds AttnVideoBlock attention; "attn-only" only the attention; "only-last-conv" only conv_out.
    """

    available_time_modes: tuple[str, ...] = tuple(TIME_MODES)

    def __init__(
        self,
        *args: Any,
        video_kernel_size: KernelSize = 3,
        alpha: float = 0.0,
        merge_strategy: str = "learned",
        time_mode: str = "conv-only",
        **kwargs: Any,
    ) -> None:
        if time_mode not in TIME_MODES:
            raise ValueError(f"time_mode {time_mode!r} is not supported; choose one of {', '.join(TIME_MODES)}")
        if merge_strategy not in VIDEO_MERGE_STRATEGIES:
            raise ValueError(
                f"merge_strategy {merge_strategy!r} is not supported by VideoDecoder; "
                f"choose one of {', '.join(VIDEO_MERGE_STRATEGIES)}"
            )
        _kernel3d(video_kernel_size)  # validate early
        self.video_kernel_size = list(video_kernel_size) if not isinstance(video_kernel_size, int) else video_kernel_size
        self.alpha, self.merge_strategy, self.time_mode = alpha, merge_strategy, time_mode
        self.temporal_parts = parts = TIME_MODES[time_mode]
        # the seeds' VideoDecoder: the temporal blocks go to the Decoder as its ops
        kwargs["conv_out_op"] = partialclass(AE3DConv, video_kernel_size=self.video_kernel_size) if parts.conv else Conv2DWrapper
        if parts.attn:
            kwargs["attn_op"] = functools.partial(make_time_attn, attn_type=kwargs.get("attn_type", "vanilla"),
                                                  alpha=alpha, merge_strategy=merge_strategy)
        if parts.res:
            kwargs["resnet_op"] = partialclass(
                VideoResBlock, video_kernel_size=self.video_kernel_size, alpha=alpha, merge_strategy=merge_strategy
            )
        super().__init__(*args, **kwargs)

    def get_last_layer(self, skip_time_mix: bool = False, **kwargs: object) -> torch.Tensor:
        """conv_out's time_mix_conv weight (or the Conv2d weight with `skip_time_mix` or without one)."""
        if skip_time_mix or not self.temporal_parts.conv:
            return self.conv_out.weight
        return self.conv_out.time_mix_conv.weight

    def forward(self, z: torch.Tensor, timesteps: int | None = None, **kwargs: object) -> torch.Tensor:
        """Decode z [B*T, z, h, w] (T frames per clip; default: the whole batch is one clip)."""
        t = _frames(z.shape[0], timesteps)
        return super().forward(z, timesteps=t, **kwargs)
