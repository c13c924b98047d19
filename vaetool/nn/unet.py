"""The timestep-conditioned DDPM UNet of ldm/sgm `diffusionmodules.model.Model` (the seeds' `Model`).

conv_in, then `len(ch_mult)` levels of res blocks (+ attention at `attn_resolutions`) with
downsampling between them, a mid block, and the mirror image upwards where every res block takes
the matching down-path activation concatenated to its input (skip connections). The timestep goes
through the VAE's sinusoidal embedding (width `ch`) and two dense layers (`temb.dense`, width
4 * ch) into every res block's `temb_proj`. Parameter names are the original ones;
vaetool.keymaps.unet_to_original converts a diffusers UNet2DModel of this layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vaetool.nn.blocks import Downsample, Normalize, ResnetBlock, Upsample, get_timestep_embedding, make_attn, nonlinearity
from vaetool.nn.checkpoint import run_checkpointed


class Model(nn.Module):
    """The DDPM UNet: x [B, in_channels, H, W] (+ `context` concatenated on channels), t [B] -> [B, out_ch, H, W]."""

    gradient_checkpointing = False  # set_gradient_checkpointing: recompute res/attention blocks in backward

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        in_channels: int,
        resolution: int,
        use_timestep: bool = True,
        use_linear_attn: bool = False,
        attn_type: str = "vanilla",
    ) -> None:
        super().__init__()
        if use_linear_attn:
            attn_type = "linear"
        self.ch, self.temb_ch = ch, ch * 4
        self.num_resolutions, self.num_res_blocks = len(ch_mult), num_res_blocks
        self.resolution, self.in_channels = resolution, in_channels
        self.use_timestep = use_timestep
        if use_timestep:
            self.temb = nn.Module()
            self.temb.dense = nn.ModuleList([nn.Linear(ch, self.temb_ch), nn.Linear(self.temb_ch, self.temb_ch)])

        def res(cin: int, cout: int) -> ResnetBlock:
            return ResnetBlock(in_channels=cin, out_channels=cout, temb_channels=self.temb_ch, dropout=dropout)

        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        curr_res = resolution
        in_ch_mult = (1, *ch_mult)
        self.down = nn.ModuleList()
        block_in = ch
        for i_level in range(self.num_resolutions):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                block.append(res(block_in, block_out))
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
        self.mid.block_1 = res(block_in, block_in)
        self.mid.attn_1 = make_attn(block_in, attn_type=attn_type)
        self.mid.block_2 = res(block_in, block_in)

        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            skip_in = ch * ch_mult[i_level]
            for i_block in range(num_res_blocks + 1):
                if i_block == num_res_blocks:
                    skip_in = ch * in_ch_mult[i_level]  # the level's input: the previous level's output
                block.append(res(block_in + skip_in, block_out))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(make_attn(block_in, attn_type=attn_type))
            up = nn.Module()
            up.block, up.attn = block, attn
            if i_level != 0:
                up.upsample = Upsample(block_in, resamp_with_conv)
                curr_res *= 2
            self.up.insert(0, up)  # up[0] is the highest resolution and runs last
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def timestep_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """t [B] -> the embedding [B, 4*ch] every res block projects."""
        temb = get_timestep_embedding(t, self.ch).to(self.temb.dense[0].weight.dtype)  # [B, ch]
        return self.temb.dense[1](nonlinearity(self.temb.dense[0](temb)))  # [B, 4*ch]

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None, context: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, C, H, W] (H, W divisible by 2**(levels-1)), t [B] when use_timestep, context [B, C', H, W] or None."""
        if context is not None:
            x = torch.cat((x, context), dim=1)  # aligned context joins on the channel axis
        temb = None
        if self.use_timestep:
            if t is None:
                raise ValueError("this Model is timestep-conditioned (use_timestep): pass t")
            temb = self.timestep_embedding(t)

        def run(block: nn.Module, *args: torch.Tensor | None) -> torch.Tensor:
            return run_checkpointed(block, self.gradient_checkpointing, *args)

        hs = [self.conv_in(x)]  # [B, ch, H, W]
        for i_level, down in enumerate(self.down):
            for i_block in range(self.num_res_blocks):
                h = run(down.block[i_block], hs[-1], temb)
                if len(down.attn) > 0:
                    h = run(down.attn[i_block], h)
                hs.append(h)
            if i_level != self.num_resolutions - 1:
                hs.append(down.downsample(hs[-1]))  # [B, C, H/2, W/2]
        h = run(self.mid.block_1, hs[-1], temb)
        h = run(self.mid.block_2, run(self.mid.attn_1, h), temb)
        for i_level in reversed(range(self.num_resolutions)):
            up = self.up[i_level]
            for i_block in range(self.num_res_blocks + 1):
                h = run(up.block[i_block], torch.cat([h, hs.pop()], dim=1), temb)  # [B, C + C_skip, h, w] in
                if len(up.attn) > 0:
                    h = run(up.attn[i_block], h)
            if i_level != 0:
                h = up.upsample(h)  # [B, C, 2h, 2w]
        h = nonlinearity(self.norm_out(h))
        return self.conv_out(h)  # [B, out_ch, H, W]

    def get_last_layer(self) -> torch.Tensor:
        """The weight of the output conv."""
        return self.conv_out.weight
