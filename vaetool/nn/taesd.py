"""TAESD, the tiny distilled autoencoders of madebyollin/taesd (taesd, taesdxl, taesd3, taef1).

`encoder` and `decoder` are the original nn.Sequential stacks (keys `encoder.N...`,
`decoder.N...`): 3x3 convs, residual `Block`s of three convs (`conv.0/2/4`, 1x1 `skip`), stride-2
convs down, nearest 2x upsampling, and a soft clamp tanh(x / 3) * 3 in front of the decoder.
The encoder takes images in [0, 1] and the decoder returns them there.

A TAESD works in its parent family's *scaled* latent space, (raw - shift) * scale: what the
diffusion model sees. The TAESD autoencoder converts at its boundary with the parent family's
LatentFormat, so it speaks raw latents like the full VAE it stands in for and a latent file decodes
the same with either. Its encoder is deterministic: `encode_moments` returns a logvar of
DETERMINISTIC_LOGVAR everywhere (the posterior clamp floor: std 3e-7 of a scaled unit).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vaetool.errors import ConfigError
from vaetool.families import FAMILIES, LatentFormat

DETERMINISTIC_LOGVAR = -30.0  # DiagonalGaussianDistribution clamps logvar to [-30, 20]
PARENTS = ("sd1", "sd2", "sdxl", "sd3", "flux")  # the families the published TAESDs were distilled for


def conv(n_in: int, n_out: int, **kwargs: object) -> nn.Conv2d:
    """3x3 conv with padding 1."""
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    """Soft clamp of the latent to about [-3, 3]: tanh(x / 3) * 3."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """relu(conv-relu-conv-relu-conv(x) + skip(x)); `skip` is a 1x1 conv only when the width changes."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(conv(n_in, n_out), nn.ReLU(), conv(n_out, n_out), nn.ReLU(), conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


def tiny_encoder(latent_channels: int, channels: int = 64, blocks: Sequence[int] = (1, 3, 3, 3)) -> nn.Sequential:
    """conv in, then per stage (a stride-2 conv after the first) `blocks[i]` Blocks, conv out: [0, 1] image -> latent."""
    layers: list[nn.Module] = [conv(3, channels)]
    for i, n in enumerate(blocks):
        if i > 0:
            layers.append(conv(channels, channels, stride=2, bias=False))
        layers.extend(Block(channels, channels) for _ in range(n))
    layers.append(conv(channels, latent_channels))
    return nn.Sequential(*layers)


def tiny_decoder(latent_channels: int, channels: int = 64, blocks: Sequence[int] = (3, 3, 3, 1)) -> nn.Sequential:
    """Clamp, conv in, ReLU, then per stage `blocks[i]` Blocks and (but the last) 2x upsample + conv, conv out."""
    layers: list[nn.Module] = [Clamp(), conv(latent_channels, channels), nn.ReLU()]
    for i, n in enumerate(blocks):
        layers.extend(Block(channels, channels) for _ in range(n))
        if i != len(blocks) - 1:
            layers += [nn.Upsample(scale_factor=2), conv(channels, channels, bias=False)]
    layers.append(conv(channels, 3))
    return nn.Sequential(*layers)


class TAESD(nn.Module):
    """Tiny autoencoder standing in for the full VAE of `family` (raw latents in and out)."""

    def __init__(
        self,
        *,
        latent_channels: int = 4,
        channels: int = 64,
        encoder_blocks: Sequence[int] = (1, 3, 3, 3),
        decoder_blocks: Sequence[int] = (3, 3, 3, 1),
        family: str | None = None,
    ) -> None:
        super().__init__()
        if len(encoder_blocks) != len(decoder_blocks):
            raise ConfigError(f"TAESD encoder and decoder need as many stages: {list(encoder_blocks)} vs {list(decoder_blocks)}")
        self.parent: LatentFormat | None = None
        if family is not None:
            if family not in PARENTS:
                raise ConfigError(f"TAESD family {family!r} is not one of {', '.join(PARENTS)}")
            self.parent = FAMILIES[family]
            if self.parent.channels != latent_channels:
                raise ConfigError(f"a {family} TAESD has {self.parent.channels} latent channels, not {latent_channels}")
        self.embed_dim, self.downscale = latent_channels, 2 ** (len(encoder_blocks) - 1)
        self.encoder = tiny_encoder(latent_channels, channels, encoder_blocks)
        self.decoder = tiny_decoder(latent_channels, channels, decoder_blocks)

    def _format(self) -> LatentFormat:
        if self.parent is None:
            raise ConfigError("this TAESD does not know its family (sd1, sd2, sdxl, sd3, flux): use a shipped config "
                              "(taesd, taesdxl, taesd3, taef1) or set params.family")
        return self.parent

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> [raw mean, constant logvar] [B, 2C, H/8, W/8]."""
        raw = self._format().to_raw(self.encoder(x.add(1).div(2)))  # TAESD latent = the parent's scaled latent
        return torch.cat([raw, torch.full_like(raw, DETERMINISTIC_LOGVAR)], dim=1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents [B, C, h, w] of the parent family -> images [B, 3, 8h, 8w] in about [-1, 1]."""
        return self.decoder(self._format().to_scaled(z)).mul(2).sub(1)
