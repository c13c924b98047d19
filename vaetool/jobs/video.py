"""Video jobs: a frame folder, animation or video file -> one latent file [T, C, h, w] (encode), that
file -> PNG frames, .gif/.webp or a video file (decode), or both without writing the latents
(roundtrip). Every output is published only when complete, or none is."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from vaetool.errors import InputError, OutputError, OutputExistsError
from vaetool.precision import Fp32Fallback
from vaetool.tiling import Tiling, choose

if TYPE_CHECKING:
    from vaetool.api import Vae
    from vaetool.video.coding import DecodePlan

__all__ = ["LATENT_SUFFIX", "VideoAction", "VideoSettings", "check_outputs", "run_video"]

LATENT_SUFFIX = ".safetensors"


class VideoAction(str, enum.Enum):
    """What a video job does."""

    encode = "encode"
    decode = "decode"
    roundtrip = "roundtrip"


@dataclass(frozen=True)
class VideoSettings:
    """Frame rate, resizing, chunking, latent form and overwriting of a video job."""

    fps: float | None = None  # default: the input's (8 for frame folders)
    resize: bool = False  # frames of another size are resized to the first frame's (default: an error)
    chunk_frames: int | None = None  # frames per temporal decoder call (default: what fits, up to 14)
    overlap: int | None = None  # frames shared by consecutive chunks (default 3, at most half a chunk)
    scaled: bool = False  # encode: store scaled latents
    overwrite: bool = False
    batch_size: int | None = None  # frames per encoder / image-decoder call (default: the planner's)
    tiling: Tiling = field(default_factory=Tiling)


class Clip(NamedTuple):
    """A video's latents [T, C, h, w] and how to play them back."""

    latents: torch.Tensor
    fps: float
    size: tuple[int, int]  # (H, W) of the frames
    scaled: bool


def check_outputs(action: VideoAction, outputs: list[Path], overwrite: bool) -> None:
    """Validate the outputs before any work: kinds for the action, no existing files, extras present, folders writable."""
    from vaetool.jobs.common import prepare_output
    from vaetool.video.writers import check_output

    if not outputs:
        raise OutputError(f"video {action.value} needs at least one -o/--output")
    if action is VideoAction.encode:
        if len(outputs) != 1 or outputs[0].suffix.lower() != LATENT_SUFFIX:
            raise OutputError(f"video encode writes one {LATENT_SUFFIX} file (-o clip{LATENT_SUFFIX})", outputs[0])
        if outputs[0].exists() and not overwrite:
            raise OutputExistsError("already exists (use --overwrite to replace it)", outputs[0])
        prepare_output(outputs[0].parent)
        return
    for out in outputs:
        check_output(out, overwrite=overwrite)
        prepare_output(out.parent)  # a frames folder is filled beside it, then renamed


def read_clip(vae: Vae, path: Path, fps: float | None, warn: Callable[[str], None]) -> Clip:
    """A video latent file, checked against the model."""
    from vaetool.video.frames import DEFAULT_FPS
    from vaetool.video.store import is_scaled, load_video_latents, original_size

    latents, meta = load_video_latents(path)
    if latents.shape[1] != vae.latent_format.channels:
        raise InputError(f"latents have {latents.shape[1]} channels but the model takes {vae.latent_format.channels}; "
                         "wrong --model/--config for this file?", path)
    if meta.get("family") not in (None, "unknown", vae.latent_format.family):
        warn(f"the latents were encoded for family {meta['family']}, the model is {vae.latent_format.family}")
    rate = fps or float(meta.get("fps") or DEFAULT_FPS)
    return Clip(latents, rate, original_size(meta, latents, vae.downscale, path), is_scaled(meta))


def encode_clip(vae: Vae, path: Path, settings: VideoSettings, fallback: Fp32Fallback, *, scaled: bool) -> Clip:
    """A frame folder, animation or video file, encoded frame by frame."""
    from vaetool.video.coding import encode_frames
    from vaetool.video.frames import open_frames

    info, frames = open_frames(path, fps=settings.fps, resize=settings.resize)
    latents, size = encode_frames(vae, frames, batch_size=settings.batch_size, tiling=settings.tiling, scaled=scaled,
                                  fallback=fallback, source=path)
    return Clip(latents, info.fps, size, scaled)


def decode_clip(vae: Vae, clip: Clip, outputs: list[Path], plan: DecodePlan, fallback: Fp32Fallback, *, overwrite: bool,
                source: Path) -> None:
    """Decode and feed every writer; all outputs are published at the end or none is."""
    from vaetool.video.coding import decode_video
    from vaetool.video.writers import FrameWriter, open_writer

    writers: list[FrameWriter] = []
    try:
        for out in outputs:
            writers.append(open_writer(out, fps=clip.fps, frames=clip.latents.shape[0], overwrite=overwrite))
        frames = decode_video(vae, clip.latents, plan, scaled=clip.scaled, size=clip.size, fallback=fallback, source=source)
        for frame in frames:  # [H, W, 3] uint8
            for writer in writers:
                writer.add(frame)
        for writer in writers:
            writer.commit()
    except BaseException:
        for writer in writers:
            writer.abort()
        raise


def run_video(
    action: VideoAction, vae: Vae, input_path: Path, outputs: list[Path], settings: VideoSettings,
    *,
    notice: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run a video job; returns its summary (frames, fps, size, latent shape, chunking, tiling, fp32 redos).

    `notice` hears notes (a frame-by-frame decode, the first fp32 redo), `warn` hears warnings.
    """
    from vaetool.video.coding import is_temporal, plan_decode
    from vaetool.video.store import save_video_latents, video_metadata

    notice = notice or (lambda text: None)
    warn = warn or (lambda text: None)
    check_outputs(action, outputs, settings.overwrite)
    summary: dict[str, Any] = {"mode": action.value, "input": str(input_path), "outputs": [str(o) for o in outputs]}
    fallback = Fp32Fallback(vae, notice)
    if action is VideoAction.decode:
        clip = read_clip(vae, input_path, settings.fps, warn)
    else:
        clip = encode_clip(vae, input_path, settings, fallback, scaled=settings.scaled and action is VideoAction.encode)
    t, c, h, w = clip.latents.shape
    summary |= {"frames": t, "fps": clip.fps, "size": list(clip.size), "latent_shape": [t, c, h, w]}
    if action is VideoAction.encode:
        meta = video_metadata(vae, fps=clip.fps, frames=t, size=clip.size, scaled=clip.scaled, source=input_path.name)
        save_video_latents(outputs[0], clip.latents, meta, overwrite=settings.overwrite)
    else:
        if not is_temporal(vae):
            name = vae.source.get("config_name") or vae.source.get("checkpoint") or "the model"
            notice(f"{name} has no temporal layers (image-only decoder); decoding frame by frame")
        f = vae.downscale
        plan = plan_decode(vae, t, h * f, w * f, chunk_frames=settings.chunk_frames, overlap=settings.overlap,
                           batch_size=settings.batch_size, tiling=settings.tiling)
        chosen = choose(vae, "decode", plan.chunk_frames, h * f, w * f, plan.tiling)
        summary |= {"temporal": plan.temporal, "chunk_frames": plan.chunk_frames, "overlap": plan.overlap,
                    "tile_mode": chosen.mode, "tile": chosen.tile_size}
        decode_clip(vae, clip, outputs, plan, fallback, overwrite=settings.overwrite, source=input_path)
    summary["fp32_retries"] = fallback.retries
    return summary
