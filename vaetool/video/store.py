"""Latents of a video on disk: one vaetool .safetensors holding [T, C, h, w] and what it takes to play it back.

Metadata (vaetool.io.latents conventions: strings, JSON for the rest): kind "video", layout "TCHW", fps, frames,
original_size [H, W] (before padding to the downscale), family, latent_format raw|scaled, scale,
shift, channels, downscale, config, checkpoint_sha256, source (the input's name), vaetool_version.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vaetool.api import Vae
from vaetool.errors import InputError
from vaetool.io.latents import load_latents, save_latent

__all__ = ["VIDEO_KIND", "is_scaled", "load_video_latents", "original_size", "save_video_latents", "video_metadata"]

VIDEO_KIND = "video"


def video_metadata(vae: Vae, *, fps: float, frames: int, size: tuple[int, int], scaled: bool, source: str) -> dict[str, Any]:
    """The metadata of a video's latent file."""
    from vaetool import __version__

    fmt = vae.latent_format
    sha = vae.source.get("sha256") or ("random-weights" if vae.source.get("random_weights") else None)
    extra = {"random_weights": True} if vae.source.get("random_weights") else {}
    return extra | {
        "kind": VIDEO_KIND,
        "layout": "TCHW",  # per-frame latents; whole-clip latents of a causal video VAE are "BCTHW" (vaetool.video.causal)
        "fps": float(fps),
        "frames": int(frames),
        "original_size": [int(size[0]), int(size[1])],
        "family": fmt.family,
        "latent_format": "scaled" if scaled else "raw",
        "scale": fmt.scale,
        "shift": fmt.shift,
        "channels": fmt.channels,
        "downscale": fmt.downscale,
        "config": vae.source.get("config_name") or vae.source.get("config"),
        "checkpoint_sha256": sha,
        "source": source,
        "vaetool_version": __version__,
    }


def save_video_latents(path: str | Path, latents: torch.Tensor, metadata: dict[str, Any], *, overwrite: bool = False) -> None:
    """Write latents [T, C, h, w] with their metadata, atomically."""
    if latents.ndim != 4:
        raise ValueError(f"expected video latents [T, C, h, w], got {tuple(latents.shape)}")
    save_latent(path, latents.float().contiguous(), {k: v for k, v in metadata.items() if v is not None}, overwrite=overwrite)


def load_video_latents(path: str | Path) -> tuple[torch.Tensor, dict[str, Any]]:
    """Latents [T, C, h, w] float32 and metadata from a video latent file (or any batch of latents)."""
    items = load_latents(path)
    if not items:
        raise InputError("no latents inside", path)
    shapes = {tuple(item.latent.shape) for item in items}
    if len(shapes) != 1:
        raise InputError(f"latents of different shapes ({', '.join(map(str, sorted(shapes)))}) are not one video", path)
    latents = torch.stack([item.latent for item in items])  # [T, C, h, w]
    metadata = dict(items[0].metadata)
    frames = metadata.get("frames")
    if isinstance(frames, int) and frames != latents.shape[0]:
        raise InputError(f"metadata says {frames} frames but the file holds {latents.shape[0]}", path)
    return latents, metadata


def is_scaled(metadata: dict[str, Any]) -> bool:
    """Whether the latents are in the diffusion model's scaled space (vaetool or loader metadata)."""
    return metadata.get("latent_format") == "scaled" or metadata.get("scaled") is True


def original_size(metadata: dict[str, Any], latents: torch.Tensor, downscale: int, path: str | Path) -> tuple[int, int]:
    """(H, W) to crop decoded frames to: the recorded original size, else the full decoded size."""
    full = (latents.shape[-2] * downscale, latents.shape[-1] * downscale)
    size = metadata.get("original_size")
    if size is None:
        return full
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError):
        raise InputError(f"metadata original_size {size!r} is not [height, width]", path) from None
    if not (0 < h <= full[0] and 0 < w <= full[1]):
        raise InputError(f"metadata original_size {h}x{w} does not fit the decoded {full[0]}x{full[1]}", path)
    return h, w
