"""The small interface the rest of vaetool uses on a loaded autoencoder (`Vae.model`).

Every autoencoder class (AutoencodingEngine and its subclasses, WanVAE, Flux2Autoencoder, TAESD)
provides:

  encode_moments(x)  images [B, 3, H, W] in [-1, 1] -> [B, 2C, H/f, W/f]: the posterior mean and
                     logvar concatenated on dim 1, in the *raw* latent space of the model's family
                     (TAESD: its parent family's raw space; logvar constant, see nn/taesd.py)
  decode(z)          raw latents [B, C, h, w] -> images [B, 3, h*f, w*f], about [-1, 1]
  embed_dim          C, the raw latent channels
  downscale          f, image pixels per latent pixel per side

Video autoencoders (WanVAE) add `encode_video_moments(x [B, 3, T, H, W])`, `decode_video(z
[B, C, t, h, w])` and `time_downscale`. Scaling raw <-> scaled latents is not the model's job:
that is vaetool.families.LatentFormat (a model whose statistics live in its checkpoint exposes
`latent_statistics()` for it).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class LatentAutoencoder(Protocol):
    """What `Vae` and the jobs call on a model (see the module docstring)."""

    embed_dim: int

    @property
    def downscale(self) -> int:
        """Image pixels per latent pixel, per side."""
        ...

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> posterior [mean, logvar] [B, 2C, H/f, W/f]."""
        ...

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents [B, C, h, w] -> images [B, 3, h*f, w*f]."""
        ...


@runtime_checkable
class VideoAutoencoder(LatentAutoencoder, Protocol):
    """A LatentAutoencoder that also codes videos, `time_downscale` frames per latent frame."""

    time_downscale: int

    def encode_video_moments(self, x: torch.Tensor) -> torch.Tensor:
        """Video [B, 3, T, H, W] -> posterior [mean, logvar] [B, 2C, t, h, w]."""
        ...

    def decode_video(self, z: torch.Tensor) -> torch.Tensor:
        """Latent video [B, C, t, h, w] -> frames [B, 3, T, H, W]."""
        ...
