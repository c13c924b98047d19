"""The Flux.2 VAE: the LDM encoder/decoder with 32 latent channels and BatchNorm latent statistics.

Parameter names follow Black Forest Labs' flux2 autoencoder: the 1x1 quant convs live inside the
coders (`encoder.quant_conv`, `decoder.post_quant_conv`) and `bn` holds `running_mean` and
`running_var` over the 2x2-patchified latent (4 * 32 = 128 channels). The model's own latent is
the raw 32-channel posterior; the normalised 128-channel form a Flux.2 transformer sees,
(patchify(z) - running_mean) / sqrt(running_var + eps), is LatentFormat's job (vaetool.families),
fed from `latent_statistics()`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vaetool.nn.coders import Decoder, Encoder


def _instantiate(cfg: dict[str, Any]) -> Any:
    from vaetool.config import instantiate_from_config  # late: config imports the model classes

    return instantiate_from_config(cfg)


class Flux2Encoder(Encoder):
    """The LDM Encoder followed by its 1x1 `quant_conv` (2z -> 2z): image -> posterior moments."""

    def __init__(self, **ddconfig: Any) -> None:
        super().__init__(**ddconfig)
        moments = 2 * int(ddconfig["z_channels"])
        self.quant_conv = nn.Conv2d(moments, moments, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(super().forward(x))  # [B, 2z, H/f, W/f]


class Flux2Decoder(Decoder):
    """The 1x1 `post_quant_conv` (z -> z) followed by the LDM Decoder."""

    def __init__(self, **ddconfig: Any) -> None:
        super().__init__(**ddconfig)
        z = int(ddconfig["z_channels"])
        self.post_quant_conv = nn.Conv2d(z, z, 1)

    def forward(self, z: torch.Tensor, **kwargs: object) -> torch.Tensor:
        return super().forward(self.post_quant_conv(z), **kwargs)  # [B, 3, H, W]


class LatentStatistics(nn.Module):
    """The `bn` of a Flux.2 checkpoint: BatchNorm running statistics only (no affine, never updated)."""

    def __init__(self, num_features: int, eps: float = 1e-4) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and sqrt(var + eps), as float64 Python tuples (JSON-ready)."""
        mean = self.running_mean.double()
        std = torch.sqrt(self.running_var.double() + self.eps)
        return tuple(mean.tolist()), tuple(std.tolist())


class Flux2Autoencoder(nn.Module):
    """Flux2Encoder -> moments; Flux2Decoder <- z; `bn` statistics for the patchified latent form."""

    def __init__(
        self,
        *,
        encoder_config: dict[str, Any],
        decoder_config: dict[str, Any],
        patch_size: int = 2,
        bn_eps: float = 1e-4,
    ) -> None:
        super().__init__()
        self.encoder = _instantiate(encoder_config)
        self.decoder = _instantiate(decoder_config)
        self.embed_dim = int(decoder_config["params"]["z_channels"])
        self.downscale = 2 ** (self.encoder.num_resolutions - 1)
        self.patch_size = patch_size
        self.bn = LatentStatistics(patch_size * patch_size * self.embed_dim, bn_eps)

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> posterior moments [B, 2z, H/f, W/f] (mean, logvar)."""
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents [B, z, h, w] -> images [B, 3, h*f, w*f]."""
        return self.decoder(z)

    def latent_statistics(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) per patchified channel, from the checkpoint's `bn` (what LatentFormat normalises with)."""
        return self.bn.mean_std()
