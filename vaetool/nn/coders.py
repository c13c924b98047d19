"""The VAE's Encoder (image -> moments) and Decoder (latent -> image).

Parameter names follow the original LDM/sgm layout so that checkpoints load without renaming.
The Decoder builds its blocks through `_make_resblock`, `_make_attn` and `_make_conv`, which the
temporal VideoDecoder overrides. `norm_groups` (default 32, as in SD) sets the groups of every
GroupNorm: small models with few channels at full resolution need fewer groups, or the last
norm becomes a per-channel instance norm that removes the image's global colour.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from vaetool.nn.blocks import Downsample, Normalize, ResnetBlock, Upsample, make_attn, norm_silu, set_norm_groups


class Encoder(nn.Module):
    """conv_in, `len(ch_mult)` levels of res blocks with downsampling between them, mid block, conv_out."""

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
        h = self.conv_in(x)  # [B, ch, H, W]
        for i_level, down in enumerate(self.down):
            for i_block in range(self.num_res_blocks):
                h = down.block[i_block](h)
                if len(down.attn) > 0:
                    h = down.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = down.downsample(h)  # [B, C, ceil(H/2), ceil(W/2)]
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(norm_silu(self.norm_out, h))  # [B, 2z, H/f, W/f]


class Decoder(nn.Module):
    """conv_in, mid block, `len(ch_mult)` levels of res blocks with upsampling, conv_out."""

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
        **ignored: object,
    ) -> None:
        super().__init__()
        if use_linear_attn:
            attn_type = "linear"
        self.ch, self.num_resolutions, self.num_res_blocks = ch, len(ch_mult), num_res_blocks
        self.give_pre_end, self.tanh_out = give_pre_end, tanh_out
        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.z_shape = (1, z_channels, curr_res, curr_res)
        resblock, attn_cls, conv_cls = self._make_resblock(), self._make_attn(), self._make_conv()

        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = resblock(in_channels=block_in, out_channels=block_in, temb_channels=0, dropout=dropout)
        self.mid.attn_1 = attn_cls(block_in, attn_type=attn_type)
        self.mid.block_2 = resblock(in_channels=block_in, out_channels=block_in, temb_channels=0, dropout=dropout)
        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                block.append(resblock(in_channels=block_in, out_channels=block_out, temb_channels=0, dropout=dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(attn_cls(block_in, attn_type=attn_type))
            up = nn.Module()
            up.block, up.attn = block, attn
            if i_level != 0:
                up.upsample = Upsample(block_in, resamp_with_conv)
                curr_res *= 2
            self.up.insert(0, up)  # up[0] is the highest resolution and runs last
        self.norm_out = Normalize(block_in)
        self.conv_out = conv_cls(block_in, out_ch, kernel_size=3, stride=1, padding=1)
        set_norm_groups(self, norm_groups)

    def _make_resblock(self) -> Callable[..., nn.Module]:
        return ResnetBlock

    def _make_attn(self) -> Callable[..., nn.Module]:
        return make_attn

    def _make_conv(self) -> Callable[..., nn.Module]:
        return nn.Conv2d

    def get_last_layer(self, **kwargs: object) -> torch.Tensor:
        """The weight of the output conv (used by adaptive GAN loss weighting)."""
        return self.conv_out.weight

    def forward(self, z: torch.Tensor, **kwargs: object) -> torch.Tensor:
        """Decode `z` [B, z, h, w]; keyword arguments (e.g. `timesteps`) go to the video blocks."""
        h = self.conv_in(z)  # [B, C, h, w]
        h = self.mid.block_1(h, None, **kwargs)
        h = self.mid.attn_1(h, **kwargs)
        h = self.mid.block_2(h, None, **kwargs)
        for i_level in reversed(range(self.num_resolutions)):
            up = self.up[i_level]
            for i_block in range(self.num_res_blocks + 1):
                h = up.block[i_block](h, None, **kwargs)
                if len(up.attn) > 0:
                    h = up.attn[i_block](h, **kwargs)
            if i_level != 0:
                h = up.upsample(h)  # [B, C, 2h, 2w]
        if self.give_pre_end:
            return h
        h = norm_silu(self.norm_out, h)
        h = self.conv_out(h, **kwargs) if kwargs else self.conv_out(h)
        return torch.tanh(h) if self.tanh_out else h  # [B, out_ch, H, W]
