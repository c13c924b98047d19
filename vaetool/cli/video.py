"""`vaetool video encode|decode|roundtrip INPUT -o OUTPUT...`: videos through the VAE.

encode: a frame folder, animated GIF/WebP/PNG or video file -> one latent .safetensors [T, C, h, w].
decode: that file -> PNG frames (a folder), .gif/.webp, or mp4/webm/mov/mkv (video extra).
roundtrip: both, without writing the latents. Every output is published only when complete.
"""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from vaetool.cli import app_state
from vaetool.cli.options import (
    AttentionOpt,
    BatchSizeOpt,
    CheckpointOpt,
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


def _decode_to(vae: Any, latents: torch.Tensor, outputs: list[Path], *, fps: float, size: tuple[int, int], scaled: bool,
               plan: Any, overwrite: bool) -> None:
    """Decode and feed every writer; all outputs are published at the end or none is."""
    from vaetool.video.coding import decode_video
    from vaetool.video.writers import open_writer

    writers = []
    try:
        for out in outputs:
            writers.append(open_writer(out, fps=fps, frames=latents.shape[0], overwrite=overwrite))
        for frame in decode_video(vae, latents, plan, scaled=scaled, size=size):  # [H, W, 3] uint8
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
    from vaetool.video.coding import encode_frames, is_temporal, plan_decode
    from vaetool.video.frames import DEFAULT_FPS, open_frames
    from vaetool.video.store import is_scaled, load_video_latents, original_size, save_video_latents, video_metadata

    _check_outputs(mode, output, overwrite)
    opts = ModelOptions(config=config, checkpoint=checkpoint, model=model, family=family, ema=ema, device=device,
                        dtype=dtype, attention=attention)
    vae = load_model(opts)
    name = vae.source.get("config_name") or vae.source.get("checkpoint") or "the model"
    summary: dict[str, Any] = {"mode": mode.value, "input": str(input_path), "outputs": [str(o) for o in output]}
    with attention_scope(opts):
        if mode is Mode.decode:
            latents, meta = load_video_latents(input_path)
            if latents.shape[1] != vae.latent_format.channels:
                raise InputError(f"latents have {latents.shape[1]} channels but {name} takes {vae.latent_format.channels}; "
                                 "wrong --model/--config for this file?", input_path)
            if meta.get("family") not in (None, "unknown", vae.latent_format.family):
                _note(f"warning: the latents were encoded for family {meta['family']}, the model is {vae.latent_format.family}")
            rate = fps or float(meta.get("fps") or DEFAULT_FPS)
            size = original_size(meta, latents, vae.downscale, input_path)
            latent_scaled = is_scaled(meta)
        else:
            info, frames = open_frames(input_path, fps=fps, resize=resize)
            latents, size = encode_frames(vae, frames, batch_size=batch_size, tile=tile.value, tile_size=tile_size,
                                          max_memory=max_memory, scaled=scaled and mode is Mode.encode)
            rate, latent_scaled = info.fps, scaled and mode is Mode.encode
        summary |= {"frames": int(latents.shape[0]), "fps": rate, "size": list(size), "latent_shape": list(latents.shape)}
        if mode is Mode.encode:
            meta = video_metadata(vae, fps=rate, frames=latents.shape[0], size=size, scaled=latent_scaled,
                                  source=input_path.name)
            save_video_latents(output[0], latents, meta, overwrite=overwrite)
        else:
            if not is_temporal(vae):
                _note(f"note: {name} has no temporal layers (image-only decoder); decoding frame by frame")
            f = vae.downscale
            plan = plan_decode(vae, latents.shape[0], latents.shape[-2] * f, latents.shape[-1] * f,
                               chunk_frames=chunk_frames, overlap=overlap, tile=tile.value, tile_size=tile_size,
                               max_memory=max_memory)
            summary |= {"temporal": plan.temporal, "chunk_frames": plan.chunk_frames, "overlap": plan.overlap, "tile": plan.tile}
            _decode_to(vae, latents, output, fps=rate, size=size, scaled=latent_scaled, plan=plan, overwrite=overwrite)
    if as_json:
        typer.echo(json.dumps(summary))
    elif not quiet:
        h, w = size
        _note(f"{mode.value}: {summary['frames']} frames {w}x{h} at {rate:g} fps -> {', '.join(summary['outputs'])}")
