"""Latent families: channel count, scale and shift of each model family's latents."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class LatentFormat:
    """How a family's raw posterior latents map to the scaled latents a diffusion model sees."""

    family: str
    channels: int
    scale: float
    shift: float = 0.0
    downscale: int = 8

    def to_scaled(self, raw: torch.Tensor) -> torch.Tensor:
        """scaled = (raw - shift) * scale."""
        return (raw - self.shift) * self.scale

    def to_raw(self, scaled: torch.Tensor) -> torch.Tensor:
        """raw = scaled / scale + shift."""
        return scaled / self.scale + self.shift

    def as_dict(self) -> dict[str, object]:
        """Plain-dict form, for metadata and JSON."""
        return asdict(self)


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
