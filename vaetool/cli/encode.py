"""`vaetool encode INPUTS... -o DIR`: images to latent files (vaetool.jobs.encode does the work)."""

from __future__ import annotations

import enum
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
    FailFastOpt,
    FamilyOpt,
    FilesFromOpt,
    JsonOpt,
    MaxMemoryOpt,
    ModelOpt,
    QuietOpt,
    RandomWeightsOpt,
    RecursiveOpt,
    Reporter,
    SubfolderOpt,
    TileMode,
    TileOpt,
    TileSizeOpt,
    VerboseOpt,
    load,
    model_spec,
    print_summary,
    run_options,
)  # fmt: skip
from vaetool.errors import InputError, UsageError

NAME = "encode"
HELP = "Encode images to latent files (.safetensors): batched by size, resumable, bad files skipped."


class OutFormat(str, enum.Enum):
    """What --format writes (vaetool.jobs.sinks)."""

    vaetool = "vaetool"
    webdataset = "webdataset"
    sd_scripts = "sd-scripts"
    musubi = "musubi"


class Alpha(str, enum.Enum):
    """What to do with an image's alpha channel."""

    composite = "composite"
    drop = "drop"


InputsArg = Annotated[list[str] | None, typer.Argument(
    help="Image files, folders and globs (quoted: 'data/**/*.png'), or WebDataset tar shards: 'data-{0000..0099}.tar', "
    "'pipe:curl -s URL'.", show_default=False)]
FormatOpt = Annotated[OutFormat, typer.Option(
    "--format", help="vaetool: .safetensors per image (or --shard-size shards); webdataset: one tar per input shard; "
    "sd-scripts: .npz caches; musubi: musubi-tuner caches (see README: Trainer formats).")]
ScaledOpt = Annotated[bool, typer.Option("--scaled", help="Store scaled latents ((raw - shift) * scale), what a diffusion model sees.")]
AlphaOpt = Annotated[Alpha, typer.Option("--alpha", help="Transparent images: composite over --background, or drop alpha.")]


def _background(value: str) -> tuple[int, int, int]:
    """Typer callback: a colour name, #rrggbb or r,g,b -> (r, g, b)."""
    from PIL import ImageColor

    try:
        parts = [int(p) for p in value.split(",")] if "," in value else list(ImageColor.getrgb(value))
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a colour (white, #rrggbb or r,g,b)") from None
    if len(parts) < 3 or not all(0 <= p <= 255 for p in parts[:3]):
        raise typer.BadParameter(f"{value!r} is not a colour (white, #rrggbb or r,g,b)")
    return parts[0], parts[1], parts[2]


def tar_shards(inputs: list[str]) -> list[str]:
    """The WebDataset shards among the inputs, brace ranges expanded ([] when none); shards and image files do not mix."""
    from vaetool.io.webdataset import expand_shards, is_shard_spec

    specs = [arg for arg in inputs if is_shard_spec(arg)]
    if specs and len(specs) != len(inputs):
        raise UsageError("give tar shards or image files and folders, not both in one run")
    return [shard for spec in specs for shard in expand_shards(spec)]


def command(
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder; the input tree is mirrored under it.", show_default=False)],
    inputs: InputsArg = None,
    recursive: RecursiveOpt = False,
    files_from: FilesFromOpt = None,
    scaled: ScaledOpt = False,
    sample: Annotated[bool, typer.Option("--sample", help="Sample the posterior (default: its mode, deterministic).")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of --sample (each image's noise depends on it and its path only).")] = 0,
    shard_size: Annotated[int | None, typer.Option("--shard-size", min=1, help="Write N latents per shard file, with index.json.")] = None,
    out_format: FormatOpt = OutFormat.vaetool,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo outputs that exist (default: skip them, to resume).")] = False,
    fail_fast: FailFastOpt = False,
    manifest: Annotated[Path | None, typer.Option("--manifest", help="JSONL record of the run (default: OUTPUT/manifest.jsonl).")] = None,
    alpha: AlphaOpt = Alpha.composite,
    background: Annotated[str, typer.Option("--background", help="Colour under transparent pixels: a name, #rrggbb or r,g,b.")] = "white",
    workers: Annotated[int, typer.Option("--workers", min=1, help="Threads decoding input files.")] = 2,
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
    verbose: VerboseOpt = False,
    as_json: JsonOpt = False,
    debug: Debug = False,
) -> None:
    """Encode images to latent files."""
    from vaetool.io.images import IMAGE_SUFFIXES
    from vaetool.io.inputs import collect_inputs
    from vaetool.io.manifest import ManifestWriter, rank_manifest_path
    from vaetool.io.shards import rank_index_name
    from vaetool.io.tar_index import tar_index_name
    from vaetool.jobs import EncodeSettings, attention_scope, encode_files
    from vaetool.jobs.common import check_writable
    from vaetool.jobs.encode import check_model, finish_ranks, rank_and_world
    from vaetool.jobs.encode_tars import encode_tar_shards

    if not inputs and files_from is None:
        raise UsageError("give image files, folders or globs, or --files-from LIST")
    spec = model_spec(config, checkpoint, model, family, ema, device, dtype, attention, random_weights, subfolder, parts="encoder")
    run_options(tile, tile_size, max_memory, batch_size)  # check the compute options before any work
    rank, world = rank_and_world()
    settings = EncodeSettings(
        out_dir=output, scaled=scaled, sample=sample, seed=seed, shard_size=shard_size, overwrite=overwrite,
        alpha=alpha.value, background=_background(background), format=out_format.value,
        shard_prefix="shard" if world == 1 else f"rank{rank}", shard_index="index.json" if world == 1 else rank_index_name(rank),
    )
    shards = tar_shards(inputs or [])
    if shards and files_from is not None:
        raise UsageError("give tar shards or --files-from, not both")
    if shards and shard_size is not None:
        raise UsageError("--shard-size groups image files into shards; tar shards keep theirs (--format webdataset: one tar per input tar)")
    if not shards and out_format is OutFormat.webdataset:
        raise UsageError("--format webdataset writes one tar per input tar shard: give shards (data-{0000..0099}.tar)")
    found = [] if shards else collect_inputs(inputs or [], recursive=recursive, files_from=files_from)
    if not shards and not found:
        raise InputError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) found", " ".join(inputs or [files_from or ""]))
    mine: list = (shards or found)[rank::world]  # whole shards, or files, to each rank
    check_writable(output)  # a folder that cannot be written fails before the model loads
    vae = load(spec)
    check_model(vae, settings)  # before the manifest is opened: a refused run leaves no folder
    manifest_path = manifest or output / "manifest.jsonl"
    part = rank_manifest_path(manifest_path, rank) if world > 1 else manifest_path
    label = "encoding" if world == 1 else f"rank {rank}/{world}"
    shard_counts = {"done": 0, "skipped": 0}
    with ManifestWriter(part) as records, Reporter(None if shards else len(mine), quiet=quiet, verbose=verbose, label=label) as reporter:
        run = run_options(tile, tile_size, max_memory, batch_size, workers=workers, fail_fast=fail_fast, reporter=reporter)
        with attention_scope(spec.attention):
            if shards:
                def on_shard(shard: str, what: str) -> None:
                    shard_counts[what] += 1
                    if verbose:
                        reporter.print(f"shard {shard}: {what}")

                summary = encode_tar_shards(vae, mine, settings, run, manifest=records, index_name=tar_index_name(rank, world),
                                            on_shard=on_shard)
            else:
                summary = encode_files(vae, mine, settings, run, manifest=records)
    finish_ranks(manifest_path, rank, world, output if shard_size is not None else None, tar_dir=output if shards else None)
    extra = {"run_id": records.run_id, "inputs": len(mine), "output": str(output), "manifest": str(part), "rank": rank, "world_size": world,
             "family": vae.latent_format.family, "dtype": str(vae.dtype).removeprefix("torch."), "format": out_format.value,
             **({"shards": len(mine), "shards_done": shard_counts["done"], "shards_skipped": shard_counts["skipped"]} if shards else {}),
             **({"random_weights": True} if vae.source.get("random_weights") else {})}
    of = (f"{summary.total} samples of {len(mine)} shards ({shard_counts['skipped']} finished before)" if shards
          else f"{len(mine)} images")
    headline = f"encoded {summary.done}, skipped {summary.skipped} (already there), failed {len(summary.failed)} of {of}"
    print_summary(headline, "input", summary, extra, as_json=as_json, quiet=quiet)
    if summary.failed:
        raise typer.Exit(1)
