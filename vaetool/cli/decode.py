"""`vaetool decode LATENTS... -o DIR`: latent files of every kind to PNG images, resumable, skips bad files.

Inputs are vaetool .safetensors (single or sharded), ComfyUI .latent, sd-scripts .npz, .npy and
weights-only .pt files, folders or globs of them; a batch inside one file becomes name_0.png,
name_1.png, ... Each latent is turned to raw form with the scale/shift its file records (else
--scaled/--raw with the model's family), decoded in batches of equal size through the streaming
engine (tiled when asked or needed), cropped to the recorded original size, and written as a PNG
with its provenance in text chunks, atomically.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Annotated, Any

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
    Reporter,
    Tile,
    TileOpt,
    TileSizeOpt,
    VerboseOpt,
    attention_scope,
    load_model,
)
from vaetool.errors import InputError, OutputError, VaeToolError
from vaetool.families import LatentFormat, get_family
from vaetool.io.latents import LatentItem
from vaetool.pipeline import (
    DEFAULT_BATCH_SIZE,
    HALF_DTYPES,
    MAX_AUTO_BATCH,
    EngineOptions,
    Job,
    Loaded,
    Stages,
    Summary,
    fp32_copy,
    memory_plan,
    run_pipeline,
)

if TYPE_CHECKING:
    from vaetool.api import Vae
    from vaetool.io.inputs import InputFile

NAME = "decode"
HELP = "Decode latent files (vaetool, ComfyUI .latent, sd-scripts .npz, .npy, .pt) to PNG images."

SUFFIX = ".png"
# what a file's metadata says about the form of its latents
SCALED_WORDS: dict[str, bool] = {"scaled": True, "raw": False}
SIZE_KEY = "original_size"  # vaetool metadata: [height, width] of the image before padding


@dataclass(frozen=True)
class DecodeJob(Job):
    """One latent to decode (or the reason its file could not be read)."""

    item: LatentItem | None = field(default=None, compare=False)
    error: str | None = None


# ---------------------------------------------------------------- the model call, shared with roundtrip


DecodeFn = Callable[[torch.Tensor], torch.Tensor]  # raw latents [B, C, h, w] -> images [B, 3, H, W] float32
# --tile mode -> (module, function) of the tiled decoder; each returns images [B, 3, H, W]
TILED_DECODERS: dict[str, tuple[str, str]] = {
    "exact": ("vaetool.tiling.exact", "decode_exact"),
    "fast": ("vaetool.tiling.fast", "decode_fast"),
}


def latent_decoder(compute: ComputeOptions) -> Callable[[Vae], DecodeFn]:
    """Decode a batch untiled ("off"), tiled ("exact"/"fast"), or tiled only when the memory planner says so ("auto")."""

    def make(vae: Vae) -> DecodeFn:
        if compute.tile is Tile.off:
            return lambda z: vae.decode(z).float()

        @torch.inference_mode()
        def run(z: torch.Tensor) -> torch.Tensor:
            mode, size = compute.tile.value, compute.tile_size
            if size is None and (mode == "auto" or compute.max_memory is not None):
                f = vae.downscale
                planned = memory_plan(vae, "decode", z.shape[-2] * f, z.shape[-1] * f, z.shape[0], compute.max_memory)
                if mode == "auto" and (planned is None or planned.fits_untiled):
                    return vae.decode(z).float()
                size = None if planned is None else planned.tile
            module, name = TILED_DECODERS["exact" if mode == "auto" else mode]
            tiled = getattr(importlib.import_module(module), name)
            z = z.to(vae.device, vae.dtype)
            return tiled(vae.model, z, **({} if size is None else {"tile": size})).float()  # [B, 3, H, W]

        return run

    return make


def decode_batch_size(vae: Vae, compute: ComputeOptions) -> int | Callable[[tuple[int, ...]], int]:
    """--batch-size, or per latent shape [C, h, w] the memory planner's batch for its image size."""
    if compute.batch_size is not None:
        return compute.batch_size
    planned: dict[tuple[int, ...], int] = {}

    def size(shape: tuple[int, ...]) -> int:
        if shape not in planned:
            f = vae.downscale
            try:
                p = memory_plan(vae, "decode", shape[-2] * f, shape[-1] * f, MAX_AUTO_BATCH, compute.max_memory)
                planned[shape] = DEFAULT_BATCH_SIZE if p is None else max(1, p.batch_size)
            except VaeToolError:  # too big even tiled: batches of one, and the decode call names the problem
                planned[shape] = 1
        return planned[shape]

    return size


def fp32_fallback(vae: Vae, make: Callable[[Vae], DecodeFn]) -> DecodeFn | None:
    """For a half-precision model: the same call on an fp32 copy made on first use (None in fp32)."""
    if vae.dtype not in HALF_DTYPES:
        return None
    cache: list[DecodeFn] = []

    def run(z: torch.Tensor) -> torch.Tensor:
        cache[:] = cache or [make(fp32_copy(vae))]  # built on the first non-finite batch only
        return cache[0](z)

    return run


def model_text(vae: Vae) -> str:
    """The model's provenance for PNG text chunks: config name, checkpoint and hash, family (JSON)."""
    src = vae.source
    fields = {
        "config": src.get("config_name") or src.get("config"),
        "checkpoint": src.get("checkpoint"),
        "sha256": src.get("sha256") or ("random-weights" if src.get("random_weights") else None),
        "family": vae.latent_format.family,
    }
    return json.dumps({k: v for k, v in fields.items() if v is not None}, sort_keys=True)


def png_text(vae: Vae, source: str, **extra: str) -> dict[str, str]:
    """PNG text chunks: where the image came from, which model, which vaetool."""
    from vaetool import __version__

    return {"vaetool.source": source, "vaetool.model": model_text(vae), "vaetool.version": __version__, **extra}


# ---------------------------------------------------------------- latents -> raw tensors


def file_says_scaled(meta: dict[str, Any]) -> bool | None:
    """Whether a file's metadata marks its latents scaled (True), raw (False), or does not say (None)."""
    if isinstance(meta.get("scaled"), bool):
        return meta["scaled"]
    return SCALED_WORDS.get(str(meta.get("latent_format", "")).lower())


def recorded_format(meta: dict[str, Any], fallback: LatentFormat, path: Path) -> LatentFormat:
    """The scale/shift a file recorded (explicit numbers, else its family), else `fallback` (the model's)."""
    if "scale" in meta:
        try:
            return LatentFormat(str(meta.get("family", "recorded")), fallback.channels, float(meta["scale"]), float(meta.get("shift", 0.0)))
        except (TypeError, ValueError):
            raise InputError(f"metadata scale/shift are not numbers: {meta['scale']!r}, {meta.get('shift')!r}", path) from None
    if isinstance(meta.get("family"), str):
        try:
            return get_family(meta["family"])
        except ValueError:
            pass  # an unknown family name: the model's own format
    return fallback


def to_raw(item: LatentItem, vae: Vae, scaled_flag: bool | None) -> tuple[torch.Tensor, str]:
    """The item's latent [C, h, w] in raw form and the form its file was in ("raw" or "scaled")."""
    said = file_says_scaled(item.metadata)
    scaled = said if said is not None else bool(scaled_flag)
    if not scaled:
        return item.latent, "raw"
    fmt = recorded_format(item.metadata, vae.latent_format, item.source)
    return fmt.to_raw(item.latent), "scaled"  # [C, h, w]


def original_size(meta: dict[str, Any]) -> tuple[int, int] | None:
    """The (height, width) of the image before padding, when the metadata records it."""
    value = meta.get(SIZE_KEY)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value):
        return int(value[0]), int(value[1])
    return None


def item_output(out_dir: Path, rel: PurePath, item: LatentItem) -> Path:
    """out_dir / the input's folder / item name .png; InputError for names that would leave out_dir."""
    name = PurePath(item.name)
    if name.is_absolute() or ".." in name.parts or not name.parts:
        raise InputError(f"latent name {item.name!r} cannot be an output file name", item.source)
    return out_dir / rel.parent / f"{item.name}{SUFFIX}"


def jobs_from_files(files: Sequence[InputFile], out_dir: Path) -> Iterator[DecodeJob]:
    """Read each latent file (lazily, in order) into one job per latent; unreadable files become failed jobs."""
    from vaetool.io.latents import load_latents

    taken: dict[Path, str] = {}
    for f in files:
        try:
            items = load_latents(f.path)
        except VaeToolError as err:
            yield DecodeJob(f.rel.as_posix(), f.path, None, error=err.problem)
            continue
        for item in items:
            key = (f.rel.parent / item.name).as_posix()
            try:
                output = item_output(out_dir, f.rel, item)
            except InputError as err:
                yield DecodeJob(key, f.path, None, error=err.problem)
                continue
            if output in taken:
                yield DecodeJob(key, f.path, None, error=f"its output {output} is also the output of {taken[output]}")
                continue
            taken[output] = f"{f.path} [{item.name}]"
            yield DecodeJob(key, f.path, output, item=item)


# ---------------------------------------------------------------- the command


@dataclass(frozen=True)
class DecodeSettings:
    """What to write and how to read latents without metadata."""

    out_dir: Path
    scaled: bool | None = None
    bits: int = 8
    overwrite: bool = False


def decode_stages(vae: Vae, settings: DecodeSettings, compute: ComputeOptions, notice: Callable[[str], None]) -> Stages[DecodeJob]:
    """load: check and unscale one latent; compute: decode a batch; write: crop and save one PNG."""
    from vaetool.io.images import crop_to, save_png
    from vaetool.io.latents import check_channels

    channels = vae.latent_format.channels
    model_name = f"the model ({vae.latent_format.family})"
    ignored: set[str] = set()

    def load(job: DecodeJob) -> Loaded:
        if job.error is not None or job.item is None:
            raise InputError(job.error or "nothing to decode", job.source)
        check_channels(job.item, channels, model_name)
        raw, form = to_raw(job.item, vae, settings.scaled)
        said = file_says_scaled(job.item.metadata)
        if settings.scaled is not None and said is not None and said != settings.scaled and form not in ignored:
            ignored.add(form)
            notice(f"{job.source}: the file says its latents are {form}; --{'scaled' if settings.scaled else 'raw'} "
                   "is ignored for files that record their form")
        text = png_text(vae, f"{job.source}" + ("" if job.item.name == job.source.stem else f" [{job.item.name}]"),
                        **{"vaetool.latent_form": form})
        return Loaded(raw, {"size": original_size(job.item.metadata), "text": text})

    make = latent_decoder(compute)
    run, redo = make(vae), fp32_fallback(vae, make)

    def write(job: DecodeJob, image: torch.Tensor, info: dict[str, Any]) -> Path:
        size = info["size"]
        if size is not None:
            image = crop_to(image, size)  # [3, h0, w0]
        output = Path(str(job.output))  # jobs without an output failed in load
        try:
            save_png(output, image, bits=settings.bits, text=info["text"], overwrite=settings.overwrite)
        except VaeToolError as err:
            raise OutputError(str(err)) from None  # the reason keeps the output's path
        return output

    return Stages(
        load=load,
        compute=lambda z, jobs: run(z),
        write=write,
        fallback=None if redo is None else (lambda z, jobs: redo(z)),
        skip=lambda job: not settings.overwrite and job.output is not None and job.output.exists(),
    )


def decode_files(
    vae: Vae, files: Sequence[InputFile], settings: DecodeSettings, compute: ComputeOptions, engine: EngineOptions
) -> Summary:
    """Decode every latent of `files` (InputFiles) to PNGs under settings.out_dir; bad ones fail alone."""
    from vaetool.io.atomic import remove_stale_temps

    remove_stale_temps(settings.out_dir)  # temp files of killed runs
    stages = decode_stages(vae, settings, compute, engine.on_notice or (lambda message: None))
    return run_pipeline(jobs_from_files(files, settings.out_dir), stages, engine)


def usage_error(message: str) -> typer.Exit:
    """Print a usage problem on stderr; the Exit (code 2) to raise."""
    app_state.err_console.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(2)


def print_summary(summary: Summary, extra: dict[str, Any], *, as_json: bool, quiet: bool) -> None:
    """The end of a run: JSON on stdout with --json, a line on stderr unless --quiet, and every failure listed."""
    out = app_state.err_console
    if as_json:
        typer.echo(json.dumps(summary.as_dict() | extra, indent=2))
    if not quiet:
        redone = f", {summary.fp32_retries} batches redone in fp32" if summary.fp32_retries else ""
        out.print(f"decoded {summary.done}, skipped {summary.skipped} (already there), failed {len(summary.failed)} "
                  f"latents from {extra['inputs']} files in {summary.seconds:.1f} s{redone} -> {extra['output']}",
                  markup=False, highlight=False, soft_wrap=True)
    if summary.stopped:
        out.print("stopped at the first failure (--fail-fast)", markup=False, highlight=False)
    if summary.failed:
        out.print(f"{len(summary.failed)} latent(s) failed:", markup=False, highlight=False)
        for failure in summary.failed:
            out.print(f"  {failure.source}: {failure.reason}", markup=False, highlight=False, soft_wrap=True)


def command(
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the PNGs; the input tree is mirrored.", show_default=False)],
    inputs: Annotated[list[str] | None, typer.Argument(help="Latent files, folders (shard folders too) or quoted globs.", show_default=False)] = None,
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Also take the latent files in subfolders.")] = False,
    files_from: Annotated[str | None, typer.Option("--files-from", help="Also decode the files listed in this file (one per line; - for stdin).")] = None,
    scaled: Annotated[bool | None, typer.Option("--scaled/--raw", help="Form of latents whose file does not say (default raw; files that record it are read as recorded).")] = None,
    bits16: Annotated[bool, typer.Option("--16bit", help="Write 16-bit PNGs (default 8-bit).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing PNGs (default: skip them, so a rerun resumes).")] = False,
    fail_fast: Annotated[bool, typer.Option("--fail-fast", help="Stop at the first bad file (default: report it and go on).")] = False,
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
    verbose: VerboseOpt = False,
    as_json: JsonOpt = False,
    debug: Debug = False,
) -> None:
    """Decode latent files to PNG images."""
    from vaetool.io.inputs import collect_inputs
    from vaetool.io.latents import LATENT_SUFFIXES

    if not inputs and files_from is None:
        raise usage_error("give latent files, folders or globs (or --files-from LIST)")
    files = collect_inputs(inputs or [], recursive=recursive, files_from=files_from, suffixes=LATENT_SUFFIXES)
    if not files:
        raise InputError(f"no latent files ({', '.join(LATENT_SUFFIXES)}) found", " ".join(inputs or [files_from or ""]))
    opts = ModelOptions(config, checkpoint, model, family, ema, device, dtype, attention)
    compute = ComputeOptions(tile, tile_size, max_memory, batch_size)
    vae = load_model(opts)
    settings = DecodeSettings(output, scaled, 16 if bits16 else 8, overwrite)
    engine = EngineOptions(batch_size=decode_batch_size(vae, compute), fail_fast=fail_fast)
    with Reporter(None, quiet=quiet, verbose=verbose, label="decoding") as reporter:
        engine = dataclasses.replace(engine, on_event=reporter.event, on_notice=reporter.notice)
        with attention_scope(opts):
            summary = decode_files(vae, files, settings, compute, engine)
    extra = {"inputs": len(files), "output": str(output), "family": vae.latent_format.family,
             "dtype": str(vae.dtype).removeprefix("torch.")}
    print_summary(summary, extra, as_json=as_json, quiet=quiet)
    if summary.failed:
        raise typer.Exit(1)
