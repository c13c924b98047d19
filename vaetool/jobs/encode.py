"""Encode image files to latent files: batched by size, resumable, rank-sharded under torchrun.

One `.safetensors` per image mirroring the input tree under the output folder (or shards with an
index when `shard_size` is set), a JSONL manifest, atomic writes (existing outputs with this run's
provenance are skipped, so a killed run resumes; outputs of other settings stop the run before any
work, vaetool.jobs.provenance), bad files reported and skipped. Under torchrun each rank encodes
inputs[rank::world] and writes manifest.rank{r}.jsonl; rank 0 merges the parts (`finish_ranks`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vaetool.errors import InputError, UsageError
from vaetool.jobs.common import RunOptions, engine_options, prepare_output
from vaetool.jobs.provenance import model_provenance
from vaetool.jobs.sinks import LATENT_SUFFIX, OUTPUT_FORMATS, TRAINER_OUTPUTS, check_shards, existing_outputs, latent_sink
from vaetool.pipeline import Event, Job, Loaded, Stages, Summary, run_pipeline
from vaetool.precision import Fp32Fallback

if TYPE_CHECKING:
    from vaetool.api import Vae
    from vaetool.io.inputs import InputFile
    from vaetool.io.manifest import ManifestWriter
    from vaetool.tiling import Tiling

__all__ = [
    "LATENT_SUFFIX", "EncodeSettings", "check_model", "encode_files", "encode_provenance", "encode_stage", "finish_ranks",
    "image_loader", "image_seed", "rank_and_world", "run_metadata",
]  # fmt: skip



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
    alpha: str = "composite"  # composite over `background`, or drop
    background: tuple[int, int, int] = (255, 255, 255)
    format: str = "vaetool"  # OUTPUT_FORMATS: vaetool files/shards, a trainer's cache files, or webdataset tars

    def __post_init__(self) -> None:
        if self.format not in OUTPUT_FORMATS:
            raise UsageError(f"unknown output format {self.format!r} (one of: {', '.join(OUTPUT_FORMATS)})")
        if self.format in TRAINER_OUTPUTS and self.scaled:
            raise UsageError(f"--format {self.format} fixes the latent form the trainer reads: drop --scaled")
        if self.format != "vaetool" and self.shard_size is not None:
            raise UsageError(f"--shard-size writes vaetool shards; it does not go with --format {self.format}")


def check_model(vae: Vae, settings: EncodeSettings) -> None:
    """UsageError when the output format has no file for the model's family (a trainer cache); nothing is written."""
    if settings.format in TRAINER_OUTPUTS:
        from vaetool.io.trainer_writers import check_family

        check_family(settings.format, vae.latent_format.family)


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
    meta |= {k: v for k, v in fmt.as_dict().items() if k not in meta and k != "channels"}  # per-channel mean/std, patch
    if vae.source.get("random_weights"):
        meta["random_weights"] = True
    if settings.sample:
        meta |= {"seed": settings.seed, "noise": "randn from torch.Generator().manual_seed(sha256(f'{seed}:{key}')[:8])"}
    return meta


def encode_provenance(vae: Vae, settings: EncodeSettings, tiling: Tiling) -> dict[str, Any]:
    """What an existing latent must record to be skipped: model fields, latent form, posterior and seed."""
    return model_provenance(vae, tiling) | {
        "latent_format": "scaled" if settings.scaled else "raw",
        "posterior": "sample" if settings.sample else "mode",
        "seed": settings.seed if settings.sample else None,
    } | ({"output_format": settings.format} if settings.format != "vaetool" else {})


def latents_of(vae: Vae, images: torch.Tensor, keys: Sequence[str], settings: EncodeSettings, run: RunOptions) -> torch.Tensor:
    """Images [B, 3, H, W] -> float32 latents [B, C, h, w]: the posterior mode, or a sample seeded per image key."""
    mean, logvar = vae.moments(images, tiling=run.tiling)  # [B, C, h, w] each
    latents = mean.float()
    if settings.sample:
        noise = [torch.randn(mean.shape[1:], generator=torch.Generator().manual_seed(image_seed(settings.seed, k))) for k in keys]
        latents = latents + torch.exp(0.5 * logvar.float()) * torch.stack(noise).to(latents.device)  # [B, C, h, w]
    return vae.latent_format.to_scaled(latents) if settings.scaled else latents


def encode_stage(
    settings: EncodeSettings, run: RunOptions, fallback: Fp32Fallback
) -> Callable[[torch.Tensor, Sequence[Job]], torch.Tensor]:
    """The compute stage: a batch of images [B, 3, H, W] -> latents (latents_of), redone in fp32 on NaN/inf."""

    def compute(images: torch.Tensor, jobs: Sequence[Job]) -> torch.Tensor:
        keys = [j.key for j in jobs]
        return fallback(lambda v: latents_of(v, images, keys, settings, run))

    return compute


def image_loader(settings: EncodeSettings, multiple: int, pin: bool = False) -> Callable[[Job], Loaded]:
    """The load stage: decode an image (a file, or a tar member's bytes), pad it (replicate) to a multiple of the downscale.

    A trainer's cache holds the latent of the whole image at its bucket size, unpadded: for those formats an
    image whose sides are not multiples of the downscale fails (the trainer would not find its cache usable).
    """
    from vaetool.io.images import load_image, pad_to_multiple

    unpadded = settings.format in TRAINER_OUTPUTS

    def load(job: Job) -> Loaded:
        if (problem := getattr(job, "error", None)) is not None:  # a tar sample the reader could not use
            raise InputError(problem, job.source)
        image = load_image(job.source, data=getattr(job, "data", None), alpha=settings.alpha,
                           background=settings.background)  # [3, H, W]
        if unpadded and (image.shape[-2] % multiple or image.shape[-1] % multiple):
            raise InputError(f"is {image.shape[-1]} x {image.shape[-2]} px; {settings.format} caches hold the latent of the "
                             f"whole image at its bucket size: crop or resize it to sides that are multiples of {multiple} "
                             "(the trainer's bucket) first", job.source)
        padded, (h, w) = pad_to_multiple(image, multiple, "replicate")  # [3, H', W']
        pad = {"mode": "replicate", "bottom": padded.shape[-2] - h, "right": padded.shape[-1] - w}
        info = {"original_size": [h, w], "padded_size": list(padded.shape[-2:]), "padding": pad}
        return Loaded(padded.pin_memory() if pin else padded, info)

    return load


def image_jobs(inputs: Sequence[InputFile], settings: EncodeSettings) -> list[Job]:
    """One job per input image; its output mirrors the input tree under out_dir (none for shards)."""
    from vaetool.io.inputs import output_path

    if settings.format in TRAINER_OUTPUTS:  # the output's name gets the image's size when it is known: out_dir/stem here
        return [Job(item.rel.as_posix(), item.path, settings.out_dir / item.out_stem) for item in inputs]
    per_file = settings.shard_size is None
    return [Job(item.rel.as_posix(), item.path, output_path(item, settings.out_dir, LATENT_SUFFIX) if per_file else None)
            for item in inputs]


def encode_files(
    vae: Vae,
    inputs: Sequence[InputFile],
    settings: EncodeSettings,
    run: RunOptions | None = None,
    *,
    manifest: ManifestWriter | None = None,
) -> Summary:
    """Encode image files to latent files (skipping this run's existing outputs); bad files fail alone. Returns the Summary.

    Existing outputs of other settings stop the run before any work (StaleOutputError) unless settings.overwrite.
    """
    from vaetool.io.atomic import remove_stale_temps

    run = run or RunOptions()
    check_model(vae, settings)  # a usage error before the output folder is made
    prepare_output(settings.out_dir)  # before any image is encoded
    provenance = encode_provenance(vae, settings, run.tiling)
    jobs = image_jobs(inputs, settings)
    skip: set[str] = set()
    if not settings.overwrite:
        if settings.shard_size is None:  # one file per image (a trainer's caches too)
            skip = existing_outputs(jobs, settings, vae.latent_format.family, provenance)
        else:
            check_shards(settings, provenance)
    remove_stale_temps(settings.out_dir)  # temp files of killed runs
    sink = latent_sink(settings, run_metadata(vae, settings) | {"provenance": provenance}, manifest, skip, vae.latent_format)
    if manifest is not None:
        manifest.start_run(run_settings(settings, provenance, len(jobs)))
    fallback = Fp32Fallback(vae, run.on_notice)
    stages = Stages(
        load=image_loader(settings, vae.downscale, pin=vae.device.type == "cuda"),
        compute=encode_stage(settings, run, fallback),
        write=sink.write,
        skip=sink.exists,
    )
    engine = replace(engine_options(vae, "encode", run), on_event=manifest_events(manifest, run))
    try:
        summary = run_pipeline(jobs, stages, engine)
    finally:
        sink.close()
    summary.fp32_retries = fallback.retries
    return summary


def manifest_events(manifest: ManifestWriter | None, run: RunOptions) -> Callable[[Event], None]:
    """The engine's event hook: failed and skipped jobs go to the manifest (writes record themselves), then to run.on_event."""

    def on_event(event: Event) -> None:
        if manifest is not None and event.kind != "done":
            if event.kind == "failed":
                manifest.record(event.job.source, None, "failed", error=event.reason, key=event.job.key)
            else:
                manifest.record(event.job.source, event.job.output, "skipped", key=event.job.key,
                                reason=event.reason or "already there with this run's settings")
        if run.on_event is not None:
            run.on_event(event)

    return on_event


def run_settings(settings: EncodeSettings, provenance: dict[str, Any], inputs: int) -> dict[str, Any]:
    """The settings of a run, for its manifest header: the provenance, where it writes, and how."""
    rank, world = rank_and_world()
    return {"command": "encode", **provenance, "inputs": inputs, "output": str(settings.out_dir), "shard_size": settings.shard_size,
            "overwrite": settings.overwrite, "alpha": settings.alpha, "background": list(settings.background), "rank": rank,
            "world_size": world}


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size from torchrun's environment ((0, 1) when not under it)."""
    return int(os.environ.get("RANK", "0")), max(1, int(os.environ.get("WORLD_SIZE", "1")))


def finish_ranks(manifest: Path, rank: int, world: int, shard_dir: Path | None = None, *, tar_dir: Path | None = None) -> None:
    """Under torchrun: wait for every rank (a gloo barrier); rank 0 merges the manifest parts and the shard or tar indexes."""
    if world == 1 or "MASTER_ADDR" not in os.environ:  # plain RANK/WORLD_SIZE: the parts stay
        return
    import torch.distributed as dist

    from vaetool.io.manifest import merge_manifests
    from vaetool.io.shards import merge_shard_indexes

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    dist.barrier()
    if rank == 0:
        merge_manifests(manifest)
        if shard_dir is not None:
            merge_shard_indexes(shard_dir)
        if tar_dir is not None:
            from vaetool.io.tar_index import merge_tar_indexes

            merge_tar_indexes(tar_dir)
    dist.destroy_process_group()
