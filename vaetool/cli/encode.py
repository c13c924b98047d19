"""`vaetool encode INPUTS... -o DIR`: images to latent files, batched by size, resumable, rank-sharded.

One `.safetensors` per image mirroring the input tree under DIR (or shards with an index with
--shard-size), a JSONL manifest, atomic writes (existing outputs are skipped, so a killed run
resumes), bad files reported and skipped. Under torchrun each rank encodes inputs[rank::world]
and writes manifest.rank{r}.jsonl; rank 0 merges the parts when the ranks can meet (gloo).
`encode_files` is the same thing as a library function.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import torch
import typer

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
from vaetool.pipeline import (
    HALF_DTYPES,
    EngineOptions,
    Event,
    Job,
    Loaded,
    LostWrites,
    MomentsFn,
    Stages,
    Summary,
    encoder_moments,
    fp32_copy,
    planned_batch_size,
    run_pipeline,
)

if TYPE_CHECKING:
    from vaetool.api import Vae
    from vaetool.io.inputs import InputFile
    from vaetool.io.manifest import ManifestWriter

NAME = "encode"
HELP = "Encode images to latent files (.safetensors): batched by size, resumable, bad files skipped."

LATENT_SUFFIX = ".safetensors"


class Alpha(str, enum.Enum):
    """What to do with an image's alpha channel."""

    composite = "composite"
    drop = "drop"


@dataclass(frozen=True)
class EncodeSettings:
    """What `encode_files` writes: latent form, posterior mode or sample, where, and input handling."""

    out_dir: Path
    scaled: bool = False
    sample: bool = False
    seed: int = 0
    shard_size: int | None = None
    shard_prefix: str = "shard"
    shard_index: str = "index.json"
    overwrite: bool = False
    alpha: str = "composite"
    background: tuple[int, int, int] = (255, 255, 255)


def image_seed(seed: int, key: str) -> int:
    """The noise seed of one image, from --seed and its key only (batching and ranks never change it)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def run_metadata(vae: Vae, settings: EncodeSettings) -> dict[str, Any]:
    """Metadata shared by every latent of a run: model, latent format, posterior, dtype, version."""
    from vaetool import __version__

    fmt = vae.latent_format
    meta: dict[str, Any] = {
        "family": fmt.family,
        "latent_format": "scaled" if settings.scaled else "raw",
        "scaled": settings.scaled,
        "scale": fmt.scale,
        "shift": fmt.shift,
        "downscale": fmt.downscale,
        "checkpoint_sha256": vae.source.get("sha256") or ("random-weights" if vae.source.get("random_weights") else None),
        "config": vae.source.get("config_name") or vae.source.get("config"),
        "posterior": "sample" if settings.sample else "mode",
        "dtype": str(vae.dtype).removeprefix("torch."),
        "vaetool_version": __version__,
    }
    if settings.sample:
        meta |= {"seed": settings.seed, "noise": "randn from torch.Generator().manual_seed(sha256(f'{seed}:{key}')[:8])"}
    return meta


def encode_compute(vae: Vae, settings: EncodeSettings, moments: MomentsFn | None = None) -> Callable[[torch.Tensor, Sequence[Job]], torch.Tensor]:
    """The compute stage: images [B, 3, H, W] -> float32 latents [B, C, h, w] (mode, or a per-image sample)."""
    moments = moments or vae.moments

    def run(images: torch.Tensor, jobs: Sequence[Job]) -> torch.Tensor:
        mean, logvar = moments(images.to(vae.device, vae.dtype, non_blocking=True))  # [B, C, h, w] each
        latents = mean.float()
        if settings.sample:
            noise = [torch.randn(mean.shape[1:], generator=torch.Generator().manual_seed(image_seed(settings.seed, j.key))) for j in jobs]
            latents = latents + torch.exp(0.5 * logvar.float()) * torch.stack(noise).to(latents.device)  # [B, C, h, w]
        return vae.latent_format.to_scaled(latents) if settings.scaled else latents

    return run


def image_loader(settings: EncodeSettings, multiple: int, pin: bool = False) -> Callable[[Job], Loaded]:
    """The load stage: decode an image file, pad it (replicate) to a multiple of the downscale."""
    from vaetool.io.images import load_image, pad_to_multiple

    def load(job: Job) -> Loaded:
        image = load_image(job.source, alpha=settings.alpha, background=settings.background)  # [3, H, W]
        padded, (h, w) = pad_to_multiple(image, multiple, "replicate")  # [3, H', W']
        pad = {"mode": "replicate", "bottom": padded.shape[-2] - h, "right": padded.shape[-1] - w}
        info = {"original_size": [h, w], "padded_size": list(padded.shape[-2:]), "padding": pad}
        return Loaded(padded.pin_memory() if pin else padded, info)

    return load


@dataclass(frozen=True)
class Sink:
    """Where latents go: `write` (writer thread), `exists` (skip on resume), `close` (write what is queued)."""

    write: Callable[[Job, torch.Tensor, dict[str, Any]], Any]
    exists: Callable[[Job], bool]
    close: Callable[[], None]


def latent_sink(settings: EncodeSettings, base: dict[str, Any], manifest: ManifestWriter | None) -> Sink:
    """One .safetensors per image, or shards with an index (--shard-size); each write is recorded in the manifest."""
    from vaetool.io.latents import save_latent
    from vaetool.io.shards import ShardWriteError, ShardWriter, read_index

    def record(job: Job, output: Path, size: int | None, info: dict[str, Any]) -> None:
        if manifest is not None:
            manifest.record(job.source, output, "written", size=size, key=job.key, image_size=info["original_size"])

    if settings.shard_size is None:
        def write_file(job: Job, latent: torch.Tensor, info: dict[str, Any]) -> Path:
            output = Path(str(job.output))
            save_latent(output, latent, base | info | {"source": str(job.source), "key": job.key}, overwrite=settings.overwrite)
            record(job, output, output.stat().st_size, info)
            return output

        return Sink(write_file, lambda job: not settings.overwrite and Path(str(job.output)).exists(), lambda: None)

    shards = ShardWriter(settings.out_dir, settings.shard_size, prefix=settings.shard_prefix,
                         index_name=settings.shard_index, overwrite=settings.overwrite)
    done = shards.done_keys()
    queued: list[tuple[Job, dict[str, Any]]] = []

    def published() -> None:  # the queued items are now in a complete shard on disk
        where = read_index(shards.index_path)["items"]
        for job, info in queued:
            record(job, settings.out_dir / where[job.key]["shard"], None, info)
        queued.clear()

    def write_shard(job: Job, latent: torch.Tensor, info: dict[str, Any]) -> None:
        queued.append((job, info))
        try:
            shards.add(job.key, latent, base | info | {"source": str(job.source)})
        except ShardWriteError as err:  # the queued items, reported done, went down with the shard
            earlier = [queued_job for queued_job, _ in queued[:-1]]
            queued.clear()
            raise LostWrites(err.problem, err.path, earlier) from err
        if len(queued) >= settings.shard_size:  # add() has written the shard
            published()

    def close() -> None:
        shards.close()
        published()

    return Sink(write_shard, lambda job: job.key in done, close)


def image_jobs(inputs: Sequence[InputFile], settings: EncodeSettings) -> list[Job]:
    """One job per input image; its output mirrors the input tree under out_dir (none for shards)."""
    from vaetool.io.inputs import output_path

    per_file = settings.shard_size is None
    return [Job(item.rel.as_posix(), item.path, output_path(item, settings.out_dir, LATENT_SUFFIX) if per_file else None)
            for item in inputs]


def encode_files(
    vae: Vae,
    inputs: Sequence[InputFile],
    settings: EncodeSettings,
    *,
    moments: Callable[[Vae], MomentsFn] | None = None,
    engine: EngineOptions | None = None,
    manifest: ManifestWriter | None = None,
) -> Summary:
    """Encode image files to latent files (skipping existing outputs); bad files fail alone. Returns the Summary."""
    from vaetool.io.atomic import remove_stale_temps

    engine = engine or EngineOptions()
    remove_stale_temps(settings.out_dir)  # temp files of killed runs
    sink = latent_sink(settings, run_metadata(vae, settings), manifest)
    make_moments = moments or (lambda v: v.moments)
    fp32: list[Vae] = []

    def fallback(images: torch.Tensor, jobs: Sequence[Job]) -> torch.Tensor:
        fp32[:] = fp32 or [fp32_copy(vae)]  # built on the first NaN batch only
        return encode_compute(fp32[0], settings, make_moments(fp32[0]))(images, jobs)

    def on_event(event: Event) -> None:
        if manifest is not None and event.kind != "done":
            status = "failed" if event.kind == "failed" else "skipped"
            output = event.job.output if status == "skipped" else None
            manifest.record(event.job.source, output, status, error=event.reason, key=event.job.key)
        if engine.on_event is not None:
            engine.on_event(event)

    stages = Stages(
        load=image_loader(settings, vae.downscale, pin=vae.device.type == "cuda"),
        compute=encode_compute(vae, settings, make_moments(vae)),
        write=sink.write,
        fallback=fallback if vae.dtype in HALF_DTYPES else None,
        skip=sink.exists,
    )
    try:
        return run_pipeline(image_jobs(inputs, settings), stages, dataclasses.replace(engine, on_event=on_event))
    finally:
        sink.close()


# ---------------------------------------------------------------- the command


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size from torchrun's environment ((0, 1) when not under it)."""
    return int(os.environ.get("RANK", "0")), max(1, int(os.environ.get("WORLD_SIZE", "1")))


def finish_ranks(manifest: Path, rank: int, world: int, shard_dir: Path | None = None) -> None:
    """Under torchrun: wait for every rank (a gloo barrier); rank 0 merges the manifest parts and shard indexes."""
    if world == 1 or "MASTER_ADDR" not in os.environ:  # plain RANK/WORLD_SIZE: the parts stay
        return
    import torch.distributed as dist

    from vaetool.io.manifest import merge_manifests

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    dist.barrier()
    if rank == 0:
        merge_manifests(manifest)
        if shard_dir is not None:
            from vaetool.io.shards import merge_shard_indexes

            merge_shard_indexes(shard_dir)
    dist.destroy_process_group()


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


def _prepare_output(out_dir: Path) -> None:
    """Create the output folder; OutputError naming it when that fails or it is not writable."""
    from vaetool.errors import OutputError

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create the output folder: {err.strerror or err}", out_dir) from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise OutputError("the output folder is not writable", out_dir)


def _report(summary: Summary, extra: dict[str, Any], *, as_json: bool, quiet: bool) -> None:
    """The summary: JSON on stdout with --json, a line on stderr unless --quiet, and every failure listed."""
    from vaetool.cli import app_state

    if as_json:
        typer.echo(json.dumps(summary.as_dict() | extra, indent=2))
    out = app_state.err_console
    if not quiet:
        out.print(f"encoded {summary.done}, skipped {summary.skipped} (already there), failed {len(summary.failed)} "
                  f"of {extra['inputs']} images in {summary.seconds:.1f} s ({summary.images_per_s:.1f} images/s) "
                  f"-> {extra['output']}", markup=False, highlight=False, soft_wrap=True)
    if summary.stopped:
        out.print("stopped at the first failure (--fail-fast)", markup=False, highlight=False)
    if summary.failed:
        out.print(f"{len(summary.failed)} input(s) failed:", markup=False, highlight=False)
        for failure in summary.failed:
            out.print(f"  {failure.source}: {failure.reason}", markup=False, highlight=False, soft_wrap=True)


def command(
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder; the input tree is mirrored under it.", show_default=False)],
    inputs: Annotated[list[str] | None, typer.Argument(help="Image files, folders and globs (quoted: 'data/**/*.png').", show_default=False)] = None,
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Also images in subfolders of folder inputs.")] = False,
    files_from: Annotated[str | None, typer.Option("--files-from", help="A file listing inputs, one per line ('-': stdin).")] = None,
    scaled: Annotated[bool, typer.Option("--scaled", help="Store scaled latents ((raw - shift) * scale), what a diffusion model sees.")] = False,
    sample: Annotated[bool, typer.Option("--sample", help="Sample the posterior (default: its mode, deterministic).")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of --sample (each image's noise depends on it and its path only).")] = 0,
    shard_size: Annotated[int | None, typer.Option("--shard-size", min=1, help="Write N latents per shard file, with index.json.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo outputs that exist (default: skip them, to resume).")] = False,
    fail_fast: Annotated[bool, typer.Option("--fail-fast", help="Stop at the first bad input.")] = False,
    manifest: Annotated[Path | None, typer.Option("--manifest", help="JSONL record of the run (default: OUTPUT/manifest.jsonl).")] = None,
    alpha: Annotated[Alpha, typer.Option("--alpha", help="Transparent images: composite over --background, or drop alpha.")] = Alpha.composite,
    background: Annotated[str, typer.Option("--background", help="Colour under transparent pixels: a name, #rrggbb or r,g,b.")] = "white",
    workers: Annotated[int, typer.Option("--workers", min=1, help="Threads decoding input files.")] = 2,
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
    """Encode images to latent files."""
    from vaetool.cli import app_state
    from vaetool.io.inputs import collect_inputs
    from vaetool.io.manifest import ManifestWriter, rank_manifest_path
    from vaetool.io.shards import rank_index_name

    if not inputs and files_from is None:
        app_state.err_console.print("error: give image files, folders or globs, or --files-from LIST", markup=False)
        raise typer.Exit(2)
    model_opts = ModelOptions(config, checkpoint, model, family, ema, device, dtype, attention)
    compute = ComputeOptions(tile, tile_size, max_memory, batch_size)
    rank, world = rank_and_world()
    settings = EncodeSettings(
        out_dir=output, scaled=scaled, sample=sample, seed=seed, shard_size=shard_size, overwrite=overwrite,
        alpha=alpha.value, background=_background(background),
        shard_prefix="shard" if world == 1 else f"rank{rank}", shard_index="index.json" if world == 1 else rank_index_name(rank),
    )
    mine = collect_inputs(inputs or [], recursive=recursive, files_from=files_from)[rank::world]
    _prepare_output(output)
    manifest_path = manifest or output / "manifest.jsonl"
    part = rank_manifest_path(manifest_path, rank) if world > 1 else manifest_path
    vae = load_model(model_opts)
    label = "encoding" if world == 1 else f"rank {rank}/{world}"
    batch = planned_batch_size(vae, "encode", compute.batch_size, compute.max_memory)
    engine = EngineOptions(batch_size=batch, workers=workers, fail_fast=fail_fast)
    with ManifestWriter(part) as records, Reporter(len(mine), quiet=quiet, verbose=verbose, label=label) as reporter:
        engine = dataclasses.replace(engine, on_event=reporter.event, on_notice=reporter.notice)
        with attention_scope(model_opts):
            summary = encode_files(vae, mine, settings, moments=encoder_moments(compute.tile.value, compute.tile_size, compute.max_memory), engine=engine, manifest=records)
    finish_ranks(manifest_path, rank, world, output if shard_size is not None else None)
    extra = {"inputs": len(mine), "output": str(output), "manifest": str(part), "rank": rank, "world_size": world,
             "family": vae.latent_format.family, "dtype": str(vae.dtype).removeprefix("torch.")}
    _report(summary, extra, as_json=as_json, quiet=quiet)
    if summary.failed:
        raise typer.Exit(1)
