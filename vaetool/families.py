"""Latent families: how each model family's raw latents map to the scaled latents its diffusion model sees.

A LatentFormat describes one map, raw (what the VAE's encoder gives and its decoder takes) ->
scaled (what the diffusion model sees), in three optional steps:

    p      = patchify(raw, patch)                 # [B, C, h, w] -> [B, C*patch^2, h/patch, w/patch]
    scaled = (p - shift - mean[c]) * scale / std[c]

and back: raw = unpatchify(scaled * std[c] / scale + shift + mean[c]). Scalar families (SD, Flux)
set scale/shift only; Wan / Qwen-Image set per-channel mean/std (16 values each); Flux.2 sets
patch 2 and takes mean/std from its checkpoint's BatchNorm statistics (`stats_from_checkpoint`;
bind them with `with_statistics` or `bind_statistics(fmt, model)` before converting). The
patchified channel c is channel c // patch^2 at offset (c % patch^2) // patch, c % patch in the
2x2 block, as Flux.2's `(c pi pj)` rearrange. Channel-wise steps work on [B, C, h, w] and on
video latents [B, C, t, h, w]. `to_scaled` / `to_raw` are the only place that converts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where a tensor is converted: reading configs stays torch-free
    import torch

# Wan 2.1 VAE latent statistics (Wan2.1 wan/modules/vae.py; diffusers' AutoencoderKLWan and
# AutoencoderKLQwenImage defaults `latents_mean` / `latents_std`)
WAN_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
            0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
           3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
OPTIONAL_DEFAULTS: dict[str, Any] = {"mean": None, "std": None, "patch": 1, "stats_from_checkpoint": False}


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, h, w] -> [B, C*p*p, h/p, w/p], channel order (c, row offset, column offset)."""
    b, c, h, w = x.shape
    if h % patch or w % patch:
        raise ValueError(f"a {h}x{w} latent does not split into {patch}x{patch} patches")
    x = x.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 1, 3, 5, 2, 4)  # [B, C, p, p, h/p, w/p]
    return x.reshape(b, c * patch * patch, h // patch, w // patch)


def unpatchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """Inverse of patchify: [B, C*p*p, h, w] -> [B, C, h*p, w*p]."""
    b, cp, h, w = x.shape
    x = x.reshape(b, cp // (patch * patch), patch, patch, h, w).permute(0, 1, 4, 2, 5, 3)  # [B, C, h, p, w, p]
    return x.reshape(b, cp // (patch * patch), h * patch, w * patch)


@dataclass(frozen=True)
class LatentFormat:
    """How a family's raw posterior latents map to the scaled latents a diffusion model sees (see module doc).

    Every format is checked when made, wherever it comes from (a family, a config, a latent file's
    metadata, a flag): scale finite and > 0, shift finite (ValueError otherwise), so a scale of 0
    can never turn every latent into zeros.
    """

    family: str
    channels: int  # raw latent channels (the VAE's embed_dim)
    scale: float
    shift: float = 0.0
    downscale: int = 8  # raw latent pixels per image pixel, per side
    mean: tuple[float, ...] | None = None  # per scaled channel (channels * patch^2 values)
    std: tuple[float, ...] | None = None
    patch: int = 1
    stats_from_checkpoint: bool = False  # mean/std come from the checkpoint (Flux.2's bn), not from here

    def __post_init__(self) -> None:
        if not _real(self.scale) or not math.isfinite(self.scale) or self.scale <= 0:
            raise ValueError(f"latent scale must be a finite number > 0, not {self.scale!r}")
        if not _real(self.shift) or not math.isfinite(self.shift):
            raise ValueError(f"latent shift must be a finite number, not {self.shift!r}")
        if not isinstance(self.channels, int) or self.channels < 0:
            raise ValueError(f"latent channels must be a whole number >= 0 (0: unknown), not {self.channels!r}")
        if not isinstance(self.downscale, int) or self.downscale < 1:
            raise ValueError(f"latent downscale must be a whole number >= 1, not {self.downscale!r}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(float(v) for v in value))
        if self.patch < 1 or self.downscale < 1:
            raise ValueError(f"{self.family}: patch and downscale must be positive, got {self.patch} and {self.downscale}")
        if (self.mean is None) != (self.std is None):
            raise ValueError(f"{self.family}: per-channel mean and std go together")
        if self.mean is not None and self.std is not None:
            if (self.channels and len(self.mean) != self.scaled_channels) or len(self.std) != len(self.mean):
                raise ValueError(f"{self.family}: {len(self.mean)} means and {len(self.std)} stds for {self.scaled_channels} channels")
            if not all(s > 0 and math.isfinite(s) for s in self.std) or not all(math.isfinite(m) for m in self.mean):
                raise ValueError(f"{self.family}: per-channel std must be positive and finite, mean finite")

    @property
    def scaled_channels(self) -> int:
        """Channels of the scaled form (channels * patch^2)."""
        return self.channels * self.patch * self.patch

    @property
    def scaled_downscale(self) -> int:
        """Image pixels per scaled-latent pixel, per side (downscale * patch)."""
        return self.downscale * self.patch

    def _affine(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-channel (offset, gain) shaped to broadcast over x's channel dim; None for a scalar format."""
        if self.mean is None or self.std is None:
            if self.stats_from_checkpoint:
                raise ValueError(f"the {self.family} latent form takes its mean/std from the checkpoint; bind them first")
            return None
        if x.shape[1] != len(self.mean):
            raise ValueError(f"{self.family} latents have {len(self.mean)} channels at this stage, got {x.shape[1]}")
        import torch

        view = (1, -1) + (1,) * (x.ndim - 2)
        mean = torch.tensor(self.mean, dtype=torch.float64, device=x.device) + self.shift
        gain = self.scale / torch.tensor(self.std, dtype=torch.float64, device=x.device)
        return mean.to(x.dtype).view(view), gain.to(x.dtype).view(view)

    def to_scaled(self, raw: torch.Tensor) -> torch.Tensor:
        """scaled = (patchify(raw) - shift - mean[c]) * scale / std[c]."""
        p = patchify(raw, self.patch) if self.patch > 1 else raw
        affine = self._affine(p)
        return (p - self.shift) * self.scale if affine is None else (p - affine[0]) * affine[1]

    def to_raw(self, scaled: torch.Tensor) -> torch.Tensor:
        """raw = unpatchify(scaled * std[c] / scale + shift + mean[c])."""
        affine = self._affine(scaled)
        p = scaled / self.scale + self.shift if affine is None else scaled / affine[1] + affine[0]
        return unpatchify(p, self.patch) if self.patch > 1 else p

    def with_statistics(self, mean: tuple[float, ...], std: tuple[float, ...]) -> LatentFormat:
        """This format with per-channel mean/std filled in (e.g. Flux.2's BatchNorm statistics)."""
        return dataclasses.replace(self, mean=mean, std=std)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict for metadata: family, channels, scale, shift, downscale, and the optional
        fields (mean, std as lists; patch; stats_from_checkpoint) only where they differ from their defaults."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, default in OPTIONAL_DEFAULTS.items():
            if out[name] == default:
                del out[name]
            elif isinstance(out[name], tuple):
                out[name] = list(out[name])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatentFormat:
        """Rebuild a format from `as_dict()` output (e.g. a latent file's metadata); ValueError if malformed."""
        known = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(data) - known):
            raise ValueError(f"unknown latent-format field(s): {', '.join(unknown)}")
        try:
            return cls(**data)
        except TypeError as err:
            raise ValueError(f"incomplete latent format: {err}") from None


def bind_statistics(fmt: LatentFormat, model: torch.nn.Module) -> LatentFormat:
    """`fmt` with the model's checkpoint statistics filled in when the format takes them from there."""
    if not fmt.stats_from_checkpoint or fmt.mean is not None:
        return fmt
    stats = getattr(model, "latent_statistics", None)
    if stats is None:
        raise ValueError(f"the {fmt.family} latent form needs statistics from the model, which has none")
    return fmt.with_statistics(*stats())


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
        LatentFormat("wan", 16, 1.0, mean=WAN_MEAN, std=WAN_STD),
        LatentFormat("qwen-image", 16, 1.0, mean=WAN_MEAN, std=WAN_STD),
        LatentFormat("flux2", 32, 1.0, patch=2, stats_from_checkpoint=True),
    )
}
# the architecture each family's latents come from; keys and shapes cannot tell families of one
# architecture apart, but they do tell architectures apart
ARCHITECTURE: dict[str, str] = {"wan": "wan", "qwen-image": "wan", "flux2": "flux2"}


def get_family(name: str) -> LatentFormat:
    """The latent format of family `name`; ValueError listing the known families otherwise."""
    try:
        return FAMILIES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown family {name!r}; choose one of {', '.join(FAMILIES)}") from None


def guess_families(latent_channels: int, downscale: int = 8, architecture: str = "kl") -> list[str]:
    """Families of `architecture` whose latents have this channel count and downscale."""
    return [
        f.family for f in FAMILIES.values()
        if f.channels == latent_channels and f.downscale == downscale and ARCHITECTURE.get(f.family, "kl") == architecture
    ]
