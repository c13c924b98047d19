"""`vaetool video encode|decode|roundtrip INPUT -o OUTPUT...`: videos through the VAE.

encode: a frame folder, animated GIF/WebP/PNG or video file -> one latent .safetensors [T, C, h, w].
decode: that file -> PNG frames (a folder), .gif/.webp, or mp4/webm/mov/mkv (video extra).
roundtrip: both, without writing the latents. Every output is published only when complete.
"""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NamedTuple

import torch
import typer

from vaetool.cli import app_state
from vaetool.cli.options import (
    AttentionOpt,
    BatchSizeOpt,
    CheckpointOpt,
    ComputeOptions,
    ConfigOpt,
    Debug,
    Device,
    DeviceOpt,
    Dtype,
    DtypeOpt,
    EmaOpt,
    FamilyOpt,
    JsonOpt,
    MaxMemoryOpt,
    ModelOpt,
    ModelOptions,
    QuietOpt,
    Tile,
    TileOpt,
    TileSizeOpt,
    attention_scope,
    load_model,
)
from vaetool.errors import InputError, OutputError

if TYPE_CHECKING:
    from vaetool.api import Vae
    from vaetool.video.coding import DecodePlan, Fp32Retry

NAME = "video"
HELP = ("Videos: frames folder / GIF / mp4 -> latents (encode), latents -> PNG frames / GIF / mp4 (decode), "
        "or both (roundtrip); chunked temporal decoding with blended overlaps.")

_VIDEO = "Video"
LATENT_SUFFIX = ".safetensors"


class Mode(str, enum.Enum):
    """What the command does."""

    encode = "encode"
    decode = "decode"
    roundtrip = "roundtrip"


def _note(text: str) -> None:
    app_state.err_console.print(text, markup=False, highlight=False, soft_wrap=True)


def _check_outputs(mode: Mode, outputs: list[Path], overwrite: bool) -> None:
    """Validate the outputs before any work: kinds for the mode, no existing files, extras present."""
    from vaetool.errors import OutputExistsError
    from vaetool.video.writers import check_output

    if not outputs:
        raise OutputError(f"video {mode.value} needs at least one -o/--output")
    if mode is Mode.encode:
        if len(outputs) != 1 or outputs[0].suffix.lower() != LATENT_SUFFIX:
            raise OutputError(f"video encode writes one {LATENT_SUFFIX} file (-o clip{LATENT_SUFFIX})", outputs[0])
        if outputs[0].exists() and not overwrite:
            raise OutputExistsError("already exists (use --overwrite to replace it)", outputs[0])
        return
    for out in outputs:
        check_output(out, overwrite=overwrite)


class Clip(NamedTuple):
    """A video's latents [T, C, h, w] and how to play them back."""

    latents: torch.Tensor
    fps: float
    size: tuple[int, int]  # (H, W) of the frames
    scaled: bool


def _read_latents(vae: Vae, path: Path, fps: float | None, name: str) -> Clip:
    """A video latent file, checked against the model."""
    from vaetool.video.frames import DEFAULT_FPS
    from vaetool.video.store import is_scaled, load_video_latents, original_size

    latents, meta = load_video_latents(path)
    if latents.shape[1] != vae.latent_format.channels:
        raise InputError(f"latents have {latents.shape[1]} channels but {name} takes {vae.latent_format.channels}; "
                         "wrong --model/--config for this file?", path)
    if meta.get("family") not in (None, "unknown", vae.latent_format.family):
        _note(f"warning: the latents were encoded for family {meta['family']}, the model is {vae.latent_format.family}")
    rate = fps or float(meta.get("fps") or DEFAULT_FPS)
    return Clip(latents, rate, original_size(meta, latents, vae.downscale, path), is_scaled(meta))


def _encode_input(
    vae: Vae, path: Path, compute: ComputeOptions, retry: Fp32Retry, *, fps: float | None, resize: bool, scaled: bool
) -> Clip:
    """A frame folder, animation or video file, encoded frame by frame."""
    from vaetool.video.coding import encode_frames
    from vaetool.video.frames import open_frames

    info, frames = open_frames(path, fps=fps, resize=resize)
    latents, size = encode_frames(vae, frames, batch_size=compute.batch_size, tile=compute.tile.value,
                                  tile_size=compute.tile_size, max_memory=compute.max_memory, scaled=scaled, retry=retry)
    return Clip(latents, info.fps, size, scaled)


def _decode_to(vae: Vae, clip: Clip, outputs: list[Path], plan: DecodePlan, retry: Fp32Retry, *, overwrite: bool) -> None:
    """Decode and feed every writer; all outputs are published at the end or none is."""
    from vaetool.video.coding import decode_video
    from vaetool.video.writers import FrameWriter, open_writer

    writers: list[FrameWriter] = []
    try:
        for out in outputs:
            writers.append(open_writer(out, fps=clip.fps, frames=clip.latents.shape[0], overwrite=overwrite))
        for frame in decode_video(vae, clip.latents, plan, scaled=clip.scaled, size=clip.size, retry=retry):  # [H, W, 3] uint8
            for writer in writers:
                writer.add(frame)
        for writer in writers:
            writer.commit()
    except BaseException:
        for writer in writers:
            writer.abort()
        raise


def command(
    mode: Annotated[Mode, typer.Argument(help="encode (video -> latents), decode (latents -> video) or roundtrip.", case_sensitive=False)],
    input_path: Annotated[Path, typer.Argument(metavar="INPUT", help="A folder of frames, a .gif/.webp/.png animation or a video file (encode, roundtrip); a latent file (decode).")],
    output: Annotated[list[Path], typer.Option("--output", "-o", help="encode: a .safetensors file. decode/roundtrip: a folder (PNG frames), .gif, .webp, or .mp4/.webm/.mov/.mkv (video extra); repeat for several.")] = [],  # noqa: B006 - typer needs a list default
    fps: Annotated[float | None, typer.Option("--fps", min=0.001, help="Frame rate (default: the input's; 8 for frame folders).", rich_help_panel=_VIDEO)] = None,
    resize: Annotated[bool, typer.Option("--resize", help="Resize frames of another size to the first frame's size (default: an error).", rich_help_panel=_VIDEO)] = False,
    chunk_frames: Annotated[int | None, typer.Option("--chunk-frames", min=1, help="Frames per temporal decoder call (default: up to 14, what fits in memory).", rich_help_panel=_VIDEO)] = None,
    overlap: Annotated[int | None, typer.Option("--overlap", min=0, help="Frames shared and cross-faded by consecutive chunks (default 3, at most half a chunk; 0: upstream's disjoint chunks).", rich_help_panel=_VIDEO)] = None,
    scaled: Annotated[bool, typer.Option("--scaled", help="encode: store scaled latents ((raw - shift) * scale).", rich_help_panel=_VIDEO)] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing outputs.", rich_help_panel=_VIDEO)] = False,
    config: ConfigOpt = None,
    checkpoint: CheckpointOpt = None,
    model: ModelOpt = None,
    family: FamilyOpt = None,
    ema: EmaOpt = False,
    device: DeviceOpt = Device.auto,
    dtype: DtypeOpt = Dtype.auto,
    attention: AttentionOpt = None,
    tile: TileOpt = Tile.auto,
    tile_size: TileSizeOpt = None,
    max_memory: MaxMemoryOpt = None,
    batch_size: BatchSizeOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
    debug: Debug = False,
) -> None:
    """Encode a video to latents, decode latents to a video, or both."""
    from vaetool.video.coding import Fp32Retry, is_temporal, plan_decode
    from vaetool.video.store import save_video_latents, video_metadata

    _check_outputs(mode, output, overwrite)
    opts = ModelOptions(config=config, checkpoint=checkpoint, model=model, family=family, ema=ema, device=device,
                        dtype=dtype, attention=attention)
    compute = ComputeOptions(tile=tile, tile_size=tile_size, max_memory=max_memory, batch_size=batch_size)
    vae = load_model(opts)
    name = vae.source.get("config_name") or vae.source.get("checkpoint") or "the model"
    summary: dict[str, Any] = {"mode": mode.value, "input": str(input_path), "outputs": [str(o) for o in output]}
    retry = Fp32Retry(vae, input_path, notice=None if quiet or as_json else lambda text: _note(f"note: {text}"))
    with attention_scope(opts):
        if mode is Mode.decode:
            clip = _read_latents(vae, input_path, fps, name)
        else:
            clip = _encode_input(vae, input_path, compute, retry, fps=fps, resize=resize, scaled=scaled and mode is Mode.encode)
        t, _, h, w = clip.latents.shape
        summary |= {"frames": t, "fps": clip.fps, "size": list(clip.size), "latent_shape": [t, clip.latents.shape[1], h, w]}
        if mode is Mode.encode:
            meta = video_metadata(vae, fps=clip.fps, frames=t, size=clip.size, scaled=clip.scaled, source=input_path.name)
            save_video_latents(output[0], clip.latents, meta, overwrite=overwrite)
        else:
            if not is_temporal(vae):
                _note(f"note: {name} has no temporal layers (image-only decoder); decoding frame by frame")
            f = vae.downscale
            plan = plan_decode(vae, t, h * f, w * f, chunk_frames=chunk_frames, overlap=overlap, batch_size=batch_size,
                               tile=tile.value, tile_size=tile_size, max_memory=max_memory)
            summary |= {"temporal": plan.temporal, "chunk_frames": plan.chunk_frames, "overlap": plan.overlap, "tile": plan.tile}
            _decode_to(vae, clip, output, plan, retry, overwrite=overwrite)
    summary["fp32_retries"] = retry.retries
    if as_json:
        typer.echo(json.dumps(summary))
    elif not quiet:
        _note(f"{mode.value}: {t} frames {clip.size[1]}x{clip.size[0]} at {clip.fps:g} fps -> {', '.join(summary['outputs'])}")
