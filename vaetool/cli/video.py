"""`vaetool video encode|decode|roundtrip INPUT -o OUTPUT...`: videos through the VAE (vaetool.jobs.video does the work)."""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Annotated

import typer

from vaetool.cli.common import (
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
    QuietOpt,
    RandomWeightsOpt,
    SubfolderOpt,
    TileMode,
    TileOpt,
    TileSizeOpt,
    load,
    model_spec,
    run_options,
    say,
)

NAME = "video"
HELP = ("Videos: frames folder / GIF / mp4 -> latents (encode), latents -> PNG frames / GIF / mp4 (decode), "
        "or both (roundtrip); chunked temporal decoding with blended overlaps.")

PANEL = "Video"


class Action(str, enum.Enum):
    """What the command does (vaetool.jobs.video.VideoAction, without importing torch to parse options)."""

    encode = "encode"
    decode = "decode"
    roundtrip = "roundtrip"


ActionArg = Annotated[Action, typer.Argument(help="encode (video -> latents), decode (latents -> video) or roundtrip.",
                                                  case_sensitive=False)]
InputArg = Annotated[Path, typer.Argument(metavar="INPUT", help="A folder of frames, a .gif/.webp/.png animation or a video file "
                                          "(encode, roundtrip); a latent file (decode).")]
OutputsOpt = Annotated[list[Path], typer.Option("--output", "-o", help="encode: a .safetensors file (Wan / Qwen-Image: one "
                                                "whole-clip latent [1, C, T', h, w]). decode/roundtrip: a folder "
                                                "(PNG frames), .gif, .webp, or .mp4/.webm/.mov/.mkv (video extra); repeat for several.")]
FpsOpt = Annotated[float | None, typer.Option("--fps", min=0.001, help="Frame rate (default: the input's; 8 for frame folders).",
                                              rich_help_panel=PANEL)]
ResizeOpt = Annotated[bool, typer.Option("--resize", help="Resize frames of another size to the first frame's size (default: an error).",
                                         rich_help_panel=PANEL)]
ChunkOpt = Annotated[int | None, typer.Option("--chunk-frames", min=1, help="Frames per temporal decoder call (default: up to 14, "
                                              "what fits in memory).", rich_help_panel=PANEL)]
OverlapOpt = Annotated[int | None, typer.Option("--overlap", min=0, help="Frames shared and cross-faded by consecutive chunks (default 3, "
                                                "at most half a chunk; 0: upstream's disjoint chunks).", rich_help_panel=PANEL)]
ScaledOpt = Annotated[bool, typer.Option("--scaled", help="encode: store scaled latents ((raw - shift) * scale).", rich_help_panel=PANEL)]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace existing outputs.", rich_help_panel=PANEL)]


def command(
    action: ActionArg,
    input_path: InputArg,
    output: OutputsOpt = [],  # noqa: B006 - typer needs a list default
    fps: FpsOpt = None,
    resize: ResizeOpt = False,
    chunk_frames: ChunkOpt = None,
    overlap: OverlapOpt = None,
    scaled: ScaledOpt = False,
    overwrite: OverwriteOpt = False,
    config: ConfigOpt = None,
    checkpoint: CheckpointOpt = None,
    subfolder: SubfolderOpt = None,
    model: ModelOpt = None,
    family: FamilyOpt = None,
    ema: EmaOpt = False,
    random_weights: RandomWeightsOpt = False,
    device: DeviceOpt = Device.auto,
    dtype: DtypeOpt = Dtype.auto,
    attention: AttentionOpt = None,
    tile: TileOpt = TileMode.auto,
    tile_size: TileSizeOpt = None,
    max_memory: MaxMemoryOpt = None,
    batch_size: BatchSizeOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
    debug: Debug = False,
) -> None:
    """Encode a video to latents, decode latents to a video, or both."""
    from vaetool.jobs import VideoAction, VideoSettings, attention_scope, run_video
    from vaetool.jobs.video import check_chunking, check_input, check_outputs

    job = VideoAction(action.value)
    check_input(job, input_path)
    check_outputs(job, output, overwrite)
    check_chunking(chunk_frames, overlap)
    spec = model_spec(config, checkpoint, model, family, ema, device, dtype, attention, random_weights, subfolder)
    tiling = run_options(tile, tile_size, max_memory, batch_size).tiling
    settings = VideoSettings(fps=fps, resize=resize, chunk_frames=chunk_frames, overlap=overlap, scaled=scaled, overwrite=overwrite,
                             batch_size=batch_size, tiling=tiling)
    vae = load(spec)
    muted = quiet  # notes go to stderr, so --json output stays clean without muting them
    with attention_scope(spec.attention):
        summary = run_video(job, vae, input_path, output, settings,
                            notice=None if muted else lambda text: say(f"note: {text}"), warn=lambda text: say(f"warning: {text}"))
    if as_json:
        typer.echo(json.dumps(summary))
    elif not quiet:
        h, w = summary["size"]
        say(f"{action.value}: {summary['frames']} frames {w}x{h} at {summary['fps']:g} fps -> {', '.join(summary['outputs'])}")
