"""The Wan 2.1 video VAE (also Qwen-Image's VAE): causal 3D convolutions, 8x space, 4x time.

Parameter names follow the original `wan/modules/vae.py` (WanVAE_): `encoder.conv1`,
`encoder.downsamples.N`, `encoder.middle.{0,1,2}`, `encoder.head.{0,2}`, the top-level `conv1`
(quant conv) and `conv2` (post-quant conv), and the decoder's flat `decoder.upsamples.N`.
A residual block is `residual` = [RMS_norm, SiLU, CausalConv3d, RMS_norm, SiLU, Dropout,
CausalConv3d] plus a 1x1x1 `shortcut` when the width changes.

Time is handled as upstream does it: the encoder sees the first frame alone, then chunks of four
frames; the decoder sees one latent frame at a time; a FrameCache carries each causal conv's past
between chunks. A temporal downsample passes the first frame through and then halves each chunk
with a stride-2 conv over (last frame of the previous chunk, chunk); a temporal upsample leaves the
first frame alone and doubles every later frame. So T = 1 + 4k frames give 1 + k latent frames,
and t latent frames decode to 1 + 4(t - 1) frames. An image is a one-frame video.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from vaetool.errors import ConfigError, InputError
from vaetool.nn.attention import attention
from vaetool.nn.blocks import upsample_conv_phases
from vaetool.nn.causal import CausalConv3d, FrameCache

CHUNK = 4  # frames per encoder chunk after the first frame (fixed upstream)
SAMPLING_MODES = ("downsample2d", "downsample3d", "upsample2d", "upsample3d")


def per_frame(fn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2D module to every frame: [B, C, T, H, W] -> [B, C', T, H', W']."""
    b, _, t = x.shape[:3]
    y = fn(x.transpose(1, 2).flatten(0, 1))  # [B*T, C, H, W] -> [B*T, C', H', W']
    return y.unflatten(0, (b, t)).transpose(1, 2)


class RMS_norm(nn.Module):  # the upstream class name
    """x / ||x|| over channels, times sqrt(C) and a learned per-channel `gamma` (fp32 for half inputs)."""

    def __init__(self, dim: int, images: bool = True) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *((1, 1) if images else (1, 1, 1))))  # [C, 1, 1(, 1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.normalize(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x, dim=1).to(x.dtype)
        return normed * self.scale * self.gamma


class ResidualBlock(nn.Module):
    """RMS_norm-SiLU-causal conv twice, plus a 1x1x1 causal conv shortcut when in_dim != out_dim."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            RMS_norm(in_dim, images=False), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMS_norm(out_dim, images=False), nn.SiLU(), nn.Dropout(dropout), CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: FrameCache | None = None) -> torch.Tensor:
        h = x
        for layer in self.residual:
            h = layer(h, cache) if isinstance(layer, CausalConv3d) else layer(h)  # [B, out, T, H, W]
        return h + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention within each frame: RMS_norm, 1x1 `to_qkv`, 1x1 `proj`, residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMS_norm(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """One frame batch [N, C, H, W] -> attention output [N, C, H, W] (before the residual)."""
        n, c, h, w = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(n, 1, 3 * c, h * w).transpose(-1, -2)  # [N, 1, HW, 3C]
        q, k, v = qkv.chunk(3, dim=-1)  # [N, 1, HW, C] each
        out = attention(q.contiguous(), k.contiguous(), v.contiguous())  # [N, 1, HW, C]
        return self.proj(out.transpose(-1, -2).reshape(n, c, h, w))

    def forward(self, x: torch.Tensor, cache: FrameCache | None = None) -> torch.Tensor:
        return x + per_frame(self.attend, x)


class Resample(nn.Module):
    """2x spatial down/upsampling per frame, with a causal time conv for the '3d' modes.

    down: `resample` = [ZeroPad2d right/bottom, 3x3 stride-2 conv]; downsample3d adds `time_conv`
    (kernel 3, stride 2 in time). up: `resample` = [nearest 2x, 3x3 conv to dim // 2]; upsample3d
    adds `time_conv` (kernel 3, 2 * dim outputs: two frames per input frame).
    """

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        if mode not in SAMPLING_MODES:
            raise ConfigError(f"Resample mode {mode!r} is not one of {', '.join(SAMPLING_MODES)}")
        self.mode = mode
        if mode.startswith("up"):
            self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest-exact"), nn.Conv2d(dim, dim // 2, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=(0, 0, 0))

    def spatial(self, x: torch.Tensor) -> torch.Tensor:
        """The per-frame 2D part on [N, C, H, W]; the upsample runs as phase convs when no gradient is needed."""
        if self.mode.startswith("up") and not torch.is_grad_enabled():
            return upsample_conv_phases(x, self.resample[1])  # [N, C/2, 2H, 2W]
        return self.resample(x)

    def forward(self, x: torch.Tensor, cache: FrameCache | None = None) -> torch.Tensor:
        temporal = self.mode.endswith("3d")
        if temporal and cache is None and x.shape[2] > 1:
            raise ValueError(f"{self.mode} over {x.shape[2]} frames needs a FrameCache (run the chunked video path)")
        if self.mode == "upsample3d" and cache is not None and not cache.first_visit(self):
            b, c, t, h, w = x.shape
            pairs = self.time_conv(x, cache).reshape(b, 2, c, t, h, w)  # [B, 2, C, T, H, W]
            x = pairs.permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)  # frames interleaved: [B, C, 2T, H, W]
        x = per_frame(self.spatial, x)
        if self.mode == "downsample3d" and cache is not None:
            prev = cache.step(self.time_conv, x, keep=1)  # the last frame of the previous chunk
            if prev is not None:
                x = self.time_conv(torch.cat([prev, x], dim=2))  # [B, C, T/2, H, W]
        return x


def _run(layers: Sequence[nn.Module], x: torch.Tensor, cache: FrameCache | None) -> torch.Tensor:
    """Run the layers in order; pass a fresh tensor and keep no reference, so each input is freed after its layer."""
    for layer in layers:
        x = layer(x, cache)
    return x


def _head(head: nn.Sequential, x: torch.Tensor, cache: FrameCache | None) -> torch.Tensor:
    return head[2](F.silu(head[0](x)), cache)


class Encoder3d(nn.Module):
    """conv1, per level `num_res_blocks` residual blocks then a (2d or 3d) downsample, middle, head."""

    def __init__(
        self,
        *,
        dim: int = 96,
        z_dim: int = 32,
        in_channels: int = 3,
        dim_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        temperal_downsample: Sequence[bool] = (False, True, True),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        dims = [dim * u for u in (1, *dim_mult)]
        self.conv1 = CausalConv3d(in_channels, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(pairwise(dims)):
            for _ in range(num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim, dropout))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                blocks.append(Resample(out_dim, "downsample3d" if temperal_downsample[i] else "downsample2d"))
        self.downsamples = nn.Sequential(*blocks)
        top = dims[-1]
        self.middle = nn.Sequential(ResidualBlock(top, top, dropout), AttentionBlock(top), ResidualBlock(top, top, dropout))
        self.head = nn.Sequential(RMS_norm(top, images=False), nn.SiLU(), CausalConv3d(top, z_dim, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: FrameCache | None = None) -> torch.Tensor:
        """Video chunk [B, 3, T, H, W] -> [B, z_dim, t, H/f, W/f]."""
        h = _run([*self.downsamples, *self.middle], self.conv1(x, cache), cache)  # conv1's output freed after its block
        return _head(self.head, h, cache)


class Decoder3d(nn.Module):
    """conv1, middle, per level `num_res_blocks + 1` residual blocks then a (2d or 3d) upsample, head.

    Every upsample halves the width, so each level after the first takes dims[i] // 2 channels in.
    """

    def __init__(
        self,
        *,
        dim: int = 96,
        z_dim: int = 16,
        out_channels: int = 3,
        dim_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        temperal_upsample: Sequence[bool] = (True, True, False),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        dims = [dim * u for u in (dim_mult[-1], *reversed(dim_mult))]
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(
            ResidualBlock(dims[0], dims[0], dropout), AttentionBlock(dims[0]), ResidualBlock(dims[0], dims[0], dropout)
        )
        blocks: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(pairwise(dims)):
            in_dim = in_dim // 2 if i > 0 else in_dim
            for _ in range(num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim, dropout))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                blocks.append(Resample(out_dim, "upsample3d" if temperal_upsample[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*blocks)
        self.head = nn.Sequential(RMS_norm(dims[-1], images=False), nn.SiLU(), CausalConv3d(dims[-1], out_channels, 3, padding=1))

    def cut(self) -> int:
        """Index in `upsamples` of the first Resample: the blocks before it run at latent resolution."""
        return next((i for i, m in enumerate(self.upsamples) if isinstance(m, Resample)), len(self.upsamples))

    def low(self, z: torch.Tensor, cache: FrameCache | None = None) -> torch.Tensor:
        """The latent-resolution part (conv1, middle with its per-frame attention, the first level): [B, z, t, h, w] -> [B, C, t, h, w]."""
        return _run([*self.middle, *self.upsamples[: self.cut()]], self.conv1(z, cache), cache)

    def high(self, h: torch.Tensor, cache: FrameCache | None = None) -> torch.Tensor:
        """The rest, all convs (no attention), and the head, unclamped: [B, C, t, h, w] -> [B, 3, T, h*f, w*f]."""
        return _head(self.head, _run(self.upsamples[self.cut() :], h, cache), cache)

    def forward(self, z: torch.Tensor, cache: FrameCache | None = None) -> torch.Tensor:
        """Latent chunk [B, z_dim, t, h, w] -> [B, 3, T, h*f, w*f]."""
        return self.high(self.low(z, cache), cache)


class WanVAE(nn.Module):
    """encoder -> conv1 (moments) ... conv2 -> decoder, with the chunked causal video path.

    The autoencoder protocol (see vaetool.nn.protocol): `encode_moments`/`decode` on images (one
    frame), `encode_video_moments`/`decode_video` on videos, `embed_dim`, `downscale` and
    `time_downscale`. Decoded frames are clamped to [-1, 1], as upstream does.
    """

    def __init__(
        self,
        *,
        dim: int = 96,
        z_dim: int = 16,
        dim_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        attn_scales: Sequence[float] = (),
        temperal_downsample: Sequence[bool] = (False, True, True),
        dropout: float = 0.0,
        in_channels: int = 3,
        out_channels: int = 3,
    ) -> None:
        super().__init__()
        if len(temperal_downsample) != len(dim_mult) - 1:
            raise ConfigError(f"temperal_downsample needs {len(dim_mult) - 1} entries (one per downsample), got {len(temperal_downsample)}")
        if attn_scales:
            raise ConfigError("attn_scales (attention inside the Wan levels) is not supported; Wan 2.1 has none")
        if CHUNK % 2 ** sum(temperal_downsample):
            raise ConfigError(f"at most two temporal downsamples fit the {CHUNK}-frame chunks, got {sum(temperal_downsample)}")
        self.embed_dim, self.downscale = z_dim, 2 ** (len(dim_mult) - 1)
        self.time_downscale = 2 ** sum(temperal_downsample)
        common = {"dim": dim, "dim_mult": dim_mult, "num_res_blocks": num_res_blocks, "dropout": dropout}
        self.encoder = Encoder3d(z_dim=2 * z_dim, in_channels=in_channels, temperal_downsample=temperal_downsample, **common)
        self.conv1 = CausalConv3d(2 * z_dim, 2 * z_dim, 1)
        self.conv2 = CausalConv3d(z_dim, z_dim, 1)
        self.decoder = Decoder3d(z_dim=z_dim, out_channels=out_channels, temperal_upsample=temperal_downsample[::-1], **common)

    def encode_video_moments(self, x: torch.Tensor) -> torch.Tensor:
        """Video [B, 3, T, H, W] in [-1, 1], T = 1 + 4k -> moments [B, 2z, 1 + (T - 1) / time_downscale, H/f, W/f]."""
        if x.ndim != 5 or (x.shape[2] - 1) % CHUNK:
            raise InputError(f"the Wan VAE encodes 1 + {CHUNK}k frames [B, 3, T, H, W]; got shape {list(x.shape)}")
        if x.shape[2] == 1:
            return self.conv1(self.encoder(x))  # [B, 2z, 1, h, w]: one frame needs no cache
        cache = FrameCache()
        chunks = [x[:, :, :1], *x[:, :, 1:].split(CHUNK, dim=2)]
        return self.conv1(torch.cat([self.encoder(c, cache) for c in chunks], dim=2))  # [B, 2z, t, h, w]

    def decode_video(self, z: torch.Tensor) -> torch.Tensor:
        """Latent video [B, z, t, h, w] -> frames [B, 3, 1 + time_downscale * (t - 1), H, W] in [-1, 1]."""
        if z.ndim != 5:
            raise InputError(f"the Wan VAE decodes latent videos [B, z, t, h, w]; got shape {list(z.shape)}")
        if z.shape[2] == 1:
            return self.decoder(self.conv2(z)).clamp_(-1.0, 1.0)
        return torch.cat(list(self.decode_video_frames(z)), dim=2)  # [B, 3, T, H, W]

    def decode_video_frames(self, z: torch.Tensor) -> Iterator[torch.Tensor]:
        """Latent video [B, z, t, h, w] -> per latent frame, its frames [B, 3, 1 or time_downscale, H, W] in [-1, 1].

        One latent frame at a time through one causal cache: memory does not grow with t. Joined
        over time, the chunks are `decode_video`'s output bit for bit.
        """
        if z.ndim != 5:
            raise InputError(f"the Wan VAE decodes latent videos [B, z, t, h, w]; got shape {list(z.shape)}")
        x = self.conv2(z)  # [B, z, t, h, w]: a 1x1x1 conv, latent-sized
        cache = FrameCache()
        for i in range(z.shape[2]):
            yield self.decoder(x[:, :, i : i + 1], cache).clamp_(-1.0, 1.0)  # [B, 3, 1 or 4, H, W]

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] -> moments [B, 2z, H/f, W/f] (mean, logvar), each image a one-frame video."""
        return self.encode_video_moments(x[:, :, None])[:, :, 0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [B, z, h, w] -> images [B, 3, h*f, w*f] in [-1, 1]."""
        return self.decode_video(z[:, :, None])[:, :, 0]
