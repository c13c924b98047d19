"""Latent families: channel count, scale and shift of each model family's latents."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

Numbers = float | tuple[float, ...]  # one value for every channel, or one per channel


def as_numbers(value: Any) -> Numbers:
    """A scale/shift as recorded (a number or a list of numbers) -> float or tuple; ValueError/TypeError otherwise."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("an empty list")
        return tuple(float(v) for v in value)
    return float(value)


@dataclass(frozen=True)
class LatentFormat:
    """How a family's raw posterior latents map to the scaled latents a diffusion model sees.

    `scale` and `shift` are one number, or one per channel (a diffusers config with
    latents_mean/latents_std: shift = mean, scale = scaling_factor / std).
    """

    family: str
    channels: int
    scale: Numbers
    shift: Numbers = 0.0
    downscale: int = 8

    def __post_init__(self) -> None:
        for name in ("scale", "shift"):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != self.channels:
                raise ValueError(f"{len(value)} per-channel {name} values for {self.channels}-channel latents")

    @staticmethod
    def _along_channels(value: Numbers, like: torch.Tensor) -> float | torch.Tensor:
        """A number as it is; per-channel values as [C, 1, 1] (channels are dim -3 of [..., C, h, w])."""
        if isinstance(value, tuple):
            return torch.tensor(value, dtype=like.dtype, device=like.device).view(-1, 1, 1)  # [C, 1, 1]
        return value

    def to_scaled(self, raw: torch.Tensor) -> torch.Tensor:
        """scaled = (raw - shift) * scale."""
        return (raw - self._along_channels(self.shift, raw)) * self._along_channels(self.scale, raw)

    def to_raw(self, scaled: torch.Tensor) -> torch.Tensor:
        """raw = scaled / scale + shift."""
        return scaled / self._along_channels(self.scale, scaled) + self._along_channels(self.shift, scaled)

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
