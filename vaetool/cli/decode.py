"""`vaetool decode LATENTS... -o DIR`: latent files of every kind to PNG images (vaetool.jobs.decode does the work)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vaetool.cli.common import (
    MODEL_PANEL,
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
    note,
    print_summary,
    run_options,
)  # fmt: skip
from vaetool.errors import InputError, UsageError

NAME = "decode"
HELP = ("Decode latent files (vaetool, ComfyUI .latent, .npy, .pt, WebDataset .tar; sd-scripts, musubi-tuner, SimpleTuner "
        "and OneTrainer caches) to PNG images.")

InputsArg = Annotated[list[str] | None, typer.Argument(
    help="Latent files, folders (shard folders too), WebDataset latent tars or quoted globs.",
                                                      show_default=False)]
PreviewOpt = Annotated[
    str | None,
    typer.Option("--preview", help="Decode with this TAESD checkpoint (the tiny preview decoder: taesd for sd1/sd2, taesdxl for "
                 "sdxl, taesd3 for sd3, taef1 for flux) instead of the full VAE, whose weights are not read (no --checkpoint): "
                 "the family comes from --family or the -m/--config config, and each PNG records preview: true.",
                 rich_help_panel=MODEL_PANEL, show_default=False),
]


def command(
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the PNGs; the input tree is mirrored.", show_default=False)],
    inputs: InputsArg = None,
    recursive: RecursiveOpt = False,
    files_from: FilesFromOpt = None,
    scaled: Annotated[bool | None, typer.Option("--scaled/--raw", help="Form of latents whose file does not say (default raw; "
                                                "files that record it are read as recorded).")] = None,
    bits16: Annotated[bool, typer.Option("--16bit", help="Write 16-bit PNGs (default 8-bit).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing PNGs (default: skip them, so a rerun resumes).")] = False,
    fail_fast: FailFastOpt = False,
    config: ConfigOpt = None,
    checkpoint: CheckpointOpt = None,
    subfolder: SubfolderOpt = None,
    model: ModelOpt = None,
    family: FamilyOpt = None,
    preview: PreviewOpt = None,
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
    """Decode latent files to PNG images."""
    from vaetool.io.inputs import collect_inputs
    from vaetool.io.latents import LATENT_SUFFIXES
    from vaetool.jobs import DecodeSettings, attention_scope, decode_files
    from vaetool.jobs.common import check_writable
    from vaetool.jobs.preview import load_preview, preview_spec

    if not inputs and files_from is None:
        raise UsageError("give latent files, folders or globs (or --files-from LIST)")
    spec = model_spec(config, checkpoint, model, family, ema, device, dtype, attention, random_weights, subfolder, parts="decoder")
    if preview is not None:
        spec = preview_spec(spec, preview)  # the TAESD instead of the full VAE; usage errors before any work
    run_options(tile, tile_size, max_memory, batch_size)  # check the compute options before any work
    files = collect_inputs(inputs or [], recursive=recursive, files_from=files_from, suffixes=LATENT_SUFFIXES)
    if not files:
        raise InputError(f"no latent files ({', '.join(LATENT_SUFFIXES)}) found", " ".join(inputs or [files_from or ""]))
    check_writable(output)  # a folder that cannot be written fails before the model loads
    vae = load_preview(spec, on_notice=note) if preview is not None else load(spec)
    settings = DecodeSettings(output, scaled, 16 if bits16 else 8, overwrite, family=family, preview=preview is not None)
    with Reporter(None, quiet=quiet, verbose=verbose, label="decoding") as reporter:
        run = run_options(tile, tile_size, max_memory, batch_size, fail_fast=fail_fast, reporter=reporter)
        with attention_scope(spec.attention):
            summary = decode_files(vae, files, settings, run)
    extra = {"inputs": len(files), "output": str(output), "family": vae.latent_format.family,
             "dtype": str(vae.dtype).removeprefix("torch."),
             **({"random_weights": True} if vae.source.get("random_weights") else {}),
             **({"preview": True} if preview is not None else {})}
    headline = (f"decoded {summary.done}, skipped {summary.skipped} (already there), failed {len(summary.failed)} "
                f"latents from {len(files)} files")
    print_summary(headline, "latent", summary, extra, as_json=as_json, quiet=quiet)
    if summary.failed:
        raise typer.Exit(1)
