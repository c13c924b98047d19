"""Video jobs of a causal video VAE (Wan 2.1, Qwen-Image): the whole clip is one latent [1, C, T', h, w].

vaetool.jobs.video sends a job here when the model codes time itself (encode, roundtrip) or the
input is a whole-clip latent file (decode); vaetool.video.causal does the coding and the file.
Clips of a length other than 1 + 4k are padded by repeating the last frame; decode gives back
exactly the recorded frame count.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from vaetool.errors import InputError
from vaetool.families import LatentFormat
from vaetool.precision import Fp32Fallback
from vaetool.tiling import Choice

if TYPE_CHECKING:
    from vaetool.api import Vae
    from vaetool.jobs.video import VideoAction, VideoSettings

__all__ = ["CausalClip", "run_causal"]


class CausalClip(NamedTuple):
    """A clip's latent [1, C, T', h, w], its real frame count and how to play it back."""

    latents: torch.Tensor
    frames: int
    fps: float
    size: tuple[int, int]  # (H, W) of the frames
    scaled: bool
    fmt: LatentFormat  # the form scaled latents are in (the file's recorded one, else the model's)


def _ignored(settings: VideoSettings) -> list[str]:
    """The options given that a causal video VAE does not use (the tiling ones it uses, to encode and to decode)."""
    given = {
        "--chunk-frames": settings.chunk_frames is not None,
        "--overlap": settings.overlap is not None,
        "--batch-size": settings.batch_size is not None,
    }
    return [name for name, on in given.items() if on]


def _when_memory_is_short(settings: VideoSettings, mode: str) -> None:
    """Have glibc return freed memory to the OS where memory is short (--max-memory given, or a tiled plan).

    The video estimates are calibrated so (vaetool.memory.return_freed_memory: without it a bf16
    decode held up to 2.5x its tensors); it costs ~11 % time (docs/memory.md), so not otherwise.
    """
    from vaetool.memory import return_freed_memory

    if settings.tiling.max_memory is not None or mode != "off":
        return_freed_memory()


def read_causal(vae: Vae, path: Path, fps: float | None, warn: Callable[[str], None]) -> CausalClip:
    """A whole-clip latent file, checked against the model."""
    from vaetool.jobs.decode import recorded_format
    from vaetool.video.causal import load_causal
    from vaetool.video.frames import DEFAULT_FPS
    from vaetool.video.store import is_scaled, original_size

    found = load_causal(path, int(vae.model.time_downscale))
    meta, scaled = found.metadata, is_scaled(found.metadata)
    fmt = recorded_format(meta, vae.latent_format, path) if scaled else vae.latent_format
    channels = fmt.scaled_channels if scaled else vae.latent_format.channels
    if found.latents.shape[1] != channels:
        raise InputError(
            f"latents have {found.latents.shape[1]} channels but the model takes {channels}; wrong --model/--config for this file?", path
        )
    if meta.get("family") not in (None, "unknown", vae.latent_format.family):
        warn(f"the latents were encoded for family {meta['family']}, the model is {vae.latent_format.family}")
    rate = fps or float(meta.get("fps") or DEFAULT_FPS)
    return CausalClip(found.latents, found.frames, rate, original_size(meta, found.latents, vae.downscale, path), scaled, fmt)


def encode_clip(
    vae: Vae, path: Path, settings: VideoSettings, fallback: Fp32Fallback, notice: Callable[[str], None], *, scaled: bool
) -> tuple[CausalClip, Choice]:
    """A frame folder, animation or video file, encoded as one clip, and the planner's tiling for it."""
    from vaetool.tiling.causal_encode import plan_video_encode
    from vaetool.video.causal import encode_causal
    from vaetool.video.frames import open_frames

    info, stream = open_frames(path, fps=settings.fps, resize=settings.resize)
    frames = list(stream)
    height, width = frames[0].image.shape[1:] if frames else (1, 1)
    choice = plan_video_encode(vae.model, len(frames), int(height), int(width), settings.tiling) if frames else Choice("off", None, 1)
    _when_memory_is_short(settings, choice.mode)
    latents, count, size = encode_causal(vae, frames, scaled=scaled, fallback=fallback, source=path, notice=notice,
                                         tile=choice.tile_size, overlap=settings.tiling.overlap)  # fmt: skip
    return CausalClip(latents, count, info.fps, size, scaled, vae.latent_format), choice


def run_causal(
    action: VideoAction,
    vae: Vae,
    input_path: Path,
    outputs: list[Path],
    settings: VideoSettings,
    fallback: Fp32Fallback,
    notice: Callable[[str], None],
    warn: Callable[[str], None],
) -> dict[str, Any]:
    """Run a video job on a causal video VAE; returns the summary's fields (frames, fps, size, latent shape, ...)."""
    from vaetool.tiling.causal_plan import plan_video
    from vaetool.video.causal import causal_metadata, decode_causal, is_causal_vae, padded_frames, save_causal
    from vaetool.video.store import video_metadata
    from vaetool.video.writers import write_frames

    if not is_causal_vae(vae):
        raise InputError(
            f"a whole-clip video latent [1, C, T', h, w] needs a causal video VAE (wan, qwen-image), "
            f"not {vae.latent_format.family}; wrong --model/--config for this file?",
            input_path,
        )
    if ignored := _ignored(settings):
        notice(
            f"{', '.join(ignored)}: not used by a causal video VAE, which codes the clip through its causal cache "
            "(encode tile by tile through the clip, decode one latent frame at a time, in spatial tiles when needed)"
        )
    if settings.tiling.mode == "exact":
        notice("--tile exact: a causal video VAE has no exact tiles; fast tiles are used")
    factor = int(vae.model.time_downscale)
    encoded: dict[str, Any] = {}  # the encode's tiling choice
    if action.value == "decode":
        clip = read_causal(vae, input_path, settings.fps, warn)
    else:
        clip, chosen = encode_clip(vae, input_path, settings, fallback, notice, scaled=settings.scaled and action.value == "encode")
        encoded = {"tile_mode": chosen.mode, "tile": chosen.tile_size}
    shape = list(clip.latents.shape)  # [1, C, T', h, w]
    summary: dict[str, Any] = {
        "frames": clip.frames,
        "fps": clip.fps,
        "size": list(clip.size),
        "latent_shape": shape,
        "layout": "BCTHW",
        "time_downscale": factor,
        "padded_frames": padded_frames(clip.frames, factor),
    }
    if action.value == "encode":
        base = video_metadata(vae, fps=clip.fps, frames=clip.frames, size=clip.size, scaled=clip.scaled, source=input_path.name)
        meta = causal_metadata(base, vae.latent_format, frames=clip.frames, latent_frames=shape[2], factor=factor)
        save_causal(outputs[0], clip.latents, meta, overwrite=settings.overwrite)
        return summary | encoded
    choice = plan_video(vae.model, tuple(shape), settings.tiling)
    _when_memory_is_short(settings, choice.mode)
    frames = decode_causal(
        vae, clip.latents, frames=clip.frames, size=clip.size, scaled=clip.scaled, fmt=clip.fmt, fallback=fallback, source=input_path,
        tile=choice.tile_size, overlap=settings.tiling.overlap, order=choice.order or "frames",
    )  # fmt: skip
    write_frames(outputs, frames, fps=clip.fps, count=clip.frames, overwrite=settings.overwrite)
    summary |= {f"encode_{k}": v for k, v in encoded.items()}  # roundtrip: the encode's tiling beside the decode's
    return summary | {"temporal": True, "chunk_frames": factor, "overlap": 0, "tile_mode": choice.mode, "tile": choice.tile_size,
                      "tile_order": choice.order}
