"""Latent families: channel count, scale and shift of each model family's latents."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class LatentFormat:
    """How a family's raw posterior latents map to the scaled latents a diffusion model sees.

    Every format is checked when made, wherever it comes from (a family, a config, a latent file's
    metadata, a flag): scale finite and > 0, shift finite (ValueError otherwise), so a scale of 0
    can never turn every latent into zeros.
    """

    family: str
    channels: int
    scale: float
    shift: float = 0.0
    downscale: int = 8

    def __post_init__(self) -> None:
        if not _real(self.scale) or not math.isfinite(self.scale) or self.scale <= 0:
            raise ValueError(f"latent scale must be a finite number > 0, not {self.scale!r}")
        if not _real(self.shift) or not math.isfinite(self.shift):
            raise ValueError(f"latent shift must be a finite number, not {self.shift!r}")
        if not isinstance(self.channels, int) or self.channels < 0:
            raise ValueError(f"latent channels must be a whole number >= 0 (0: unknown), not {self.channels!r}")
        if not isinstance(self.downscale, int) or self.downscale < 1:
            raise ValueError(f"latent downscale must be a whole number >= 1, not {self.downscale!r}")

    def to_scaled(self, raw: torch.Tensor) -> torch.Tensor:
        """scaled = (raw - shift) * scale."""
        return (raw - self.shift) * self.scale

    def to_raw(self, scaled: torch.Tensor) -> torch.Tensor:
        """raw = scaled / scale + shift."""
        return scaled / self.scale + self.shift

    def as_dict(self) -> dict[str, object]:
        """Plain-dict form, for metadata and JSON."""
        return asdict(self)


def _real(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


FAMILIES: dict[str, LatentFormat] = {
    f.family: f
    for f in (
        LatentFormat("sd1", 4, 0.18215),
        LatentFormat("sd2", 4, 0.18215),
        LatentFormat("sdxl", 4, 0.13025),
        LatentFormat("sd3", 16, 1.5305, 0.0609),
        LatentFormat("flux", 16, 0.3611, 0.1159),
        LatentFormat("svd", 4, 0.18215),
        LatentFormat("sd-x4-upscaler", 4, 0.08333, 0.0, 4),
    )
}


def get_family(name: str) -> LatentFormat:
    """The latent format of family `name`; ValueError listing the known families otherwise."""
    try:
        return FAMILIES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown family {name!r}; choose one of {', '.join(FAMILIES)}") from None


def guess_families(latent_channels: int, downscale: int = 8) -> list[str]:
    """Families whose latents have this channel count and downscale (keys alone cannot tell them apart)."""
    return [f.family for f in FAMILIES.values() if f.channels == latent_channels and f.downscale == downscale]
