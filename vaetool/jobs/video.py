"""Video jobs: a frame folder, animation or video file -> one latent file [T, C, h, w] (encode), that
file -> PNG frames, .gif/.webp or a video file (decode), or both without writing the latents
(roundtrip). Every output is published only when complete, or none is. A causal video VAE (Wan
2.1, Qwen-Image) codes the whole clip as one latent [1, C, T', h, w] instead (vaetool.jobs.video_causal)."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from vaetool.errors import InputError, OutputError, OutputExistsError, UsageError
from vaetool.precision import Fp32Fallback
from vaetool.tiling import Tiling, choose

if TYPE_CHECKING:
    from vaetool.api import Vae
    from vaetool.video.coding import DecodePlan

__all__ = [
    "LATENT_SUFFIX", "VideoAction", "VideoSettings", "check_chunking", "check_input", "check_outputs", "run_video",
]

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
    """Validate the outputs before any work: kinds for the action (UsageError), no existing files, extras present, folders writable."""
    from vaetool.jobs.common import prepare_output
    from vaetool.video.writers import check_output, output_kind

    if not outputs:
        raise UsageError(f"video {action.value} needs at least one -o/--output")
    if len(set(outputs)) != len(outputs):
        raise UsageError("given twice as -o/--output", next(o for o in outputs if outputs.count(o) > 1))
    if action is VideoAction.encode:
        if len(outputs) != 1 or outputs[0].suffix.lower() != LATENT_SUFFIX:
            raise UsageError(f"video encode writes one {LATENT_SUFFIX} file (-o clip{LATENT_SUFFIX})", outputs[0])
        if outputs[0].exists() and not overwrite:
            raise OutputExistsError("already exists (use --overwrite to replace it)", outputs[0])
        prepare_output(outputs[0].parent)
        return
    for out in outputs:
        try:
            output_kind(out)
        except OutputError as err:  # an image suffix where a video goes: the command used wrongly
            raise UsageError(err.problem, err.path) from None
        check_output(out, overwrite=overwrite)
        prepare_output(out.parent)  # a frames folder is filled beside it, then renamed


def check_input(action: VideoAction, path: Path) -> None:
    """UsageError when INPUT is the wrong kind of file for the action (a missing file is left to the reader)."""
    from vaetool.io.latent_item import LATENT_SUFFIXES
    from vaetool.video.frames import ANIMATED_SUFFIXES, VIDEO_SUFFIXES

    if not path.is_file():
        return
    suffix = path.suffix.lower()
    if action is VideoAction.decode and suffix not in LATENT_SUFFIXES:
        raise UsageError(f"video decode reads latents ({', '.join(LATENT_SUFFIXES)}), not a {suffix or 'suffix-less'} "
                         "file; `vaetool video encode` makes them from a video", path)
    if action is not VideoAction.decode and suffix not in ANIMATED_SUFFIXES + VIDEO_SUFFIXES:
        raise UsageError(f"unsupported video input {suffix!r} (a folder of frames, or one of "
                         f"{', '.join(ANIMATED_SUFFIXES + VIDEO_SUFFIXES)})", path)


def check_chunking(chunk_frames: int | None, overlap: int | None) -> None:
    """UsageError when --chunk-frames and --overlap given together do not fit (overlap at most half a chunk)."""
    from vaetool.video.chunks import validate_chunking

    if chunk_frames is not None and overlap is not None:
        try:
            validate_chunking(chunk_frames, overlap)
        except ValueError as err:
            raise UsageError(f"--chunk-frames {chunk_frames} / --overlap {overlap}: {err}") from None


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
    from vaetool.video.writers import write_frames

    frames = decode_video(vae, clip.latents, plan, scaled=clip.scaled, size=clip.size, fallback=fallback, source=source)
    write_frames(outputs, frames, fps=clip.fps, count=clip.latents.shape[0], overwrite=overwrite)


def run_video(
    action: VideoAction, vae: Vae, input_path: Path, outputs: list[Path], settings: VideoSettings,
    *,
    notice: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run a video job; returns its summary (frames, fps, size, latent shape, chunking, tiling, fp32 redos).

    `notice` hears notes (a frame-by-frame decode, the first fp32 redo), `warn` hears warnings.
    """
    from vaetool.video.causal import causal_header, is_causal_vae
    from vaetool.video.coding import is_temporal, plan_decode
    from vaetool.video.store import save_video_latents, video_metadata

    notice = notice or (lambda text: None)
    warn = warn or (lambda text: None)
    check_outputs(action, outputs, settings.overwrite)
    summary: dict[str, Any] = {"mode": action.value, "input": str(input_path), "outputs": [str(o) for o in outputs]}
    fallback = Fp32Fallback(vae, notice)
    causal = causal_header(input_path) is not None if action is VideoAction.decode else is_causal_vae(vae)
    if causal:  # the model codes the whole clip (Wan), or the file holds such a clip
        from vaetool.jobs.video_causal import run_causal

        summary |= run_causal(action, vae, input_path, outputs, settings, fallback, notice, warn)
        summary["fp32_retries"] = fallback.retries
        return summary
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
