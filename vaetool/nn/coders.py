"""The VAE's Encoder (image -> moments) and Decoder (latent -> image).

Parameter names follow the original LDM/sgm layout so that checkpoints load without renaming.
The Decoder builds its blocks with `resnet_op`, `attn_op` and `conv_out_op` (as the seeds'
Decoder does; the temporal VideoDecoder passes its video blocks there). From YAML an op is an
allowed target name, or a {target, params} mapping whose params are bound. `norm_groups`
(default 32, as in SD) sets the groups of every GroupNorm: small models with few channels at full
resolution need fewer groups, or the last norm becomes a per-channel instance norm that removes
the image's global colour. `gradient_checkpointing` (vaetool.nn.checkpoint) recomputes every res
and attention block in backward instead of keeping its activations.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from vaetool.config import resolve_target
from vaetool.errors import ConfigError
from vaetool.nn.blocks import Downsample, Normalize, ResnetBlock, Upsample, make_attn, norm_silu_conv, set_norm_groups
from vaetool.nn.checkpoint import run_checkpointed

Op = Callable[..., nn.Module] | str | dict[str, Any] | None


def resolve_op(op: Op, what: str) -> Callable[..., nn.Module] | None:
    """A block factory from a callable, an allowed target name, or a {target, params} mapping (params bound)."""
    if op is None or callable(op):
        return op
    if isinstance(op, str):
        return resolve_target(op)
    if isinstance(op, dict) and "target" in op:
        params = op.get("params") or {}
        if not isinstance(params, dict):
            raise ConfigError(f"{what}: 'params' must be a mapping, got {type(params).__name__}")
        return functools.partial(resolve_target(op["target"]), **params)
    raise ConfigError(f"{what} must be a target name or a mapping with 'target', got {str(op)[:80]!r}")


class Encoder(nn.Module):
    """conv_in, `len(ch_mult)` levels of res blocks with downsampling between them, mid block, conv_out."""

    gradient_checkpointing = False

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        in_channels: int,
        resolution: int,
        z_channels: int,
        double_z: bool = True,
        use_linear_attn: bool = False,
        attn_type: str = "vanilla",
        norm_groups: int = 32,
        **ignored: object,
    ) -> None:
        super().__init__()
        if use_linear_attn:
            attn_type = "linear"
        self.ch, self.num_resolutions, self.num_res_blocks = ch, len(ch_mult), num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        curr_res = resolution
        in_ch_mult = (1, *ch_mult)
        self.down = nn.ModuleList()
        block_in = ch
        for i_level in range(self.num_resolutions):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                block.append(ResnetBlock(in_channels=block_in, out_channels=block_out, temb_channels=0, dropout=dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(make_attn(block_in, attn_type=attn_type))
            down = nn.Module()
            down.block, down.attn = block, attn
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in, resamp_with_conv)
                curr_res //= 2
            self.down.append(down)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in, temb_channels=0, dropout=dropout)
        self.mid.attn_1 = make_attn(block_in, attn_type=attn_type)
        self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in, temb_channels=0, dropout=dropout)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, kernel_size=3, stride=1, padding=1)
        set_norm_groups(self, norm_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def run(block: nn.Module, h: torch.Tensor) -> torch.Tensor:
            return run_checkpointed(block, self.gradient_checkpointing, h)

        h = self.conv_in(x)  # [B, ch, H, W]
        for i_level, down in enumerate(self.down):
            for i_block in range(self.num_res_blocks):
                h = run(down.block[i_block], h)
                if len(down.attn) > 0:
                    h = run(down.attn[i_block], h)
            if i_level != self.num_resolutions - 1:
                h = down.downsample(h)  # [B, C, ceil(H/2), ceil(W/2)]
        h = run(self.mid.block_2, run(self.mid.attn_1, run(self.mid.block_1, h)))
        return norm_silu_conv(self.norm_out, self.conv_out, h)  # [B, 2z, H/f, W/f]


class Decoder(nn.Module):
    """conv_in, mid block, `len(ch_mult)` levels of res blocks with upsampling, conv_out.

    resnet_op(in_channels=, out_channels=, temb_channels=, dropout=) builds the res blocks (default
    ResnetBlock), attn_op(channels) the attention blocks (default: make_attn with `attn_type`),
    conv_out_op(cin, cout, kernel_size=3, stride=1, padding=1) the output conv (default nn.Conv2d).
    """

    gradient_checkpointing = False

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        in_channels: int,
        resolution: int,
        z_channels: int,
        give_pre_end: bool = False,
        tanh_out: bool = False,
        use_linear_attn: bool = False,
        attn_type: str = "vanilla",
        norm_groups: int = 32,
        conv_out_op: Op = None,
        resnet_op: Op = None,
        attn_op: Op = None,
        **ignored: object,
    ) -> None:
        super().__init__()
        if use_linear_attn:
            attn_type = "linear"
        self.ch, self.num_resolutions, self.num_res_blocks = ch, len(ch_mult), num_res_blocks
        self.give_pre_end, self.tanh_out = give_pre_end, tanh_out
        resblock = resolve_op(resnet_op, "resnet_op") or ResnetBlock
        attn_cls = resolve_op(attn_op, "attn_op") or functools.partial(make_attn, attn_type=attn_type)
        conv_cls = resolve_op(conv_out_op, "conv_out_op") or nn.Conv2d
        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.z_shape = (1, z_channels, curr_res, curr_res)

        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = resblock(in_channels=block_in, out_channels=block_in, temb_channels=0, dropout=dropout)
        self.mid.attn_1 = attn_cls(block_in)
        self.mid.block_2 = resblock(in_channels=block_in, out_channels=block_in, temb_channels=0, dropout=dropout)
        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                block.append(resblock(in_channels=block_in, out_channels=block_out, temb_channels=0, dropout=dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(attn_cls(block_in))
            up = nn.Module()
            up.block, up.attn = block, attn
            if i_level != 0:
                up.upsample = Upsample(block_in, resamp_with_conv)
                curr_res *= 2
            self.up.insert(0, up)  # up[0] is the highest resolution and runs last
        self.norm_out = Normalize(block_in)
        self.conv_out = conv_cls(block_in, out_ch, kernel_size=3, stride=1, padding=1)
        set_norm_groups(self, norm_groups)

    def get_last_layer(self, **kwargs: object) -> torch.Tensor:
        """The weight of the output conv (used by adaptive GAN loss weighting)."""
        return self.conv_out.weight

    def forward(self, z: torch.Tensor, **kwargs: object) -> torch.Tensor:
        """Decode `z` [B, z, h, w]; keyword arguments (e.g. `timesteps`) go to the video blocks."""
        def run(block: nn.Module, *args: torch.Tensor | None) -> torch.Tensor:
            return run_checkpointed(block, self.gradient_checkpointing, *args, **kwargs)

        h = self.conv_in(z)  # [B, C, h, w]
        h = run(self.mid.block_1, h, None)
        h = run(self.mid.attn_1, h)
        h = run(self.mid.block_2, h, None)
        for i_level in reversed(range(self.num_resolutions)):
            up = self.up[i_level]
            for i_block in range(self.num_res_blocks + 1):
                h = run(up.block[i_block], h, None)
                if len(up.attn) > 0:
                    h = run(up.attn[i_block], h)
            if i_level != 0:
                h = up.upsample(h)  # [B, C, 2h, 2w]
        if self.give_pre_end:
            return h
        h = norm_silu_conv(self.norm_out, self.conv_out, h, **kwargs)  # kwargs (timesteps) go to a video conv_out
        return torch.tanh(h) if self.tanh_out else h  # [B, out_ch, H, W]
