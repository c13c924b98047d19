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
from typing import TYPE_CHECKING, Any, NoReturn

import torch

from vaetool.errors import OutputError, OutputExistsError
from vaetool.jobs.common import RunOptions, engine_options, prepare_output
from vaetool.jobs.provenance import StaleOutputs, check_output, latent_provenance, mismatch, model_provenance
from vaetool.pipeline import AlreadyWritten, Event, Job, Loaded, LostWrites, Stages, Summary, run_pipeline
from vaetool.precision import Fp32Fallback

if TYPE_CHECKING:
    from vaetool.api import Vae
    from vaetool.io.inputs import InputFile
    from vaetool.io.manifest import ManifestWriter
    from vaetool.tiling import Tiling

__all__ = ["LATENT_SUFFIX", "EncodeSettings", "encode_files", "encode_provenance", "finish_ranks", "image_loader", "image_seed",
           "rank_and_world", "run_metadata"]

LATENT_SUFFIX = ".safetensors"


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
    }


def latents_of(vae: Vae, images: torch.Tensor, keys: Sequence[str], settings: EncodeSettings, run: RunOptions) -> torch.Tensor:
    """Images [B, 3, H, W] -> float32 latents [B, C, h, w]: the posterior mode, or a sample seeded per image key."""
    mean, logvar = vae.moments(images, tiling=run.tiling)  # [B, C, h, w] each
    latents = mean.float()
    if settings.sample:
        noise = [torch.randn(mean.shape[1:], generator=torch.Generator().manual_seed(image_seed(settings.seed, k))) for k in keys]
        latents = latents + torch.exp(0.5 * logvar.float()) * torch.stack(noise).to(latents.device)  # [B, C, h, w]
    return vae.latent_format.to_scaled(latents) if settings.scaled else latents


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
    """Where latents go: `write` (writer thread), `exists` (skip on resume: this run's own), `close` (write what is queued)."""

    write: Callable[[Job, torch.Tensor, dict[str, Any]], Any]
    exists: Callable[[Job], bool]
    close: Callable[[], None]


def existing_outputs(jobs: Sequence[Job], provenance: dict[str, Any], out_dir: Path) -> set[str]:
    """Keys of the jobs whose output exists with this provenance; StaleOutputError when others exist (headers only)."""
    stale, ours = StaleOutputs(), set()
    for job in jobs:
        output = Path(str(job.output))
        if not output.exists():
            continue
        reason = check_output(output, provenance, latent_provenance)
        if reason is None:
            ours.add(job.key)
        else:
            stale.add(output, reason)
    stale.raise_if_any(out_dir)
    return ours


def written_meanwhile(output: Path, provenance: dict[str, Any]) -> NoReturn:
    """An output another process published while this one computed it: AlreadyWritten (skipped) when it is this run's."""
    reason = check_output(output, provenance, latent_provenance)
    if reason is None:
        raise AlreadyWritten("written by another run")
    raise OutputError(f"{output} was written meanwhile by another run with other settings ({reason})")


def _file_sink(settings: EncodeSettings, base: dict[str, Any], record: Callable[..., None], skip: set[str]) -> Sink:
    """One .safetensors per image."""
    from vaetool.io.latents import save_latent

    def write(job: Job, latent: torch.Tensor, info: dict[str, Any]) -> Path:
        output = Path(str(job.output))
        try:
            save_latent(output, latent, base | info | {"source": str(job.source), "key": job.key}, overwrite=settings.overwrite)
        except OutputExistsError:  # another process wrote it since the check (two encodes into one folder)
            written_meanwhile(output, base["provenance"])
        record(job, output, output.stat().st_size, info)
        return output

    return Sink(write, lambda job: job.key in skip, lambda: None)


def check_shards(settings: EncodeSettings, provenance: dict[str, Any]) -> None:
    """StaleOutputError when the shard index or a shard of this prefix records other settings (headers only)."""
    from vaetool.io.shards import read_index, shard_files

    stale = StaleOutputs()
    index_path = settings.out_dir / settings.shard_index
    index = read_index(index_path)
    if index["items"] and (reason := mismatch(index.get("provenance"), provenance)) is not None:
        stale.add(index_path, reason)
    for shard in shard_files(settings.out_dir, settings.shard_prefix) if settings.out_dir.is_dir() else []:
        if (reason := check_output(shard, provenance, latent_provenance)) is not None:
            stale.add(shard, reason)
    stale.raise_if_any(settings.out_dir)


def _shard_sink(settings: EncodeSettings, base: dict[str, Any], record: Callable[..., None], skip: set[str]) -> Sink:
    """`shard_size` latents per shard file, with an index; items count as written once their shard is on disk."""
    from vaetool.io.shards import ShardWriteError, ShardWriter, read_index

    shards = ShardWriter(settings.out_dir, int(settings.shard_size or 1), prefix=settings.shard_prefix,
                         index_name=settings.shard_index, overwrite=settings.overwrite, provenance=base["provenance"])
    done = shards.done_keys()
    queued: list[tuple[Job, dict[str, Any]]] = []

    def published() -> None:  # the queued items are now in a complete shard on disk
        where = read_index(shards.index_path)["items"]
        for job, info in queued:
            record(job, settings.out_dir / where[job.key]["shard"], None, info)
        queued.clear()

    def write(job: Job, latent: torch.Tensor, info: dict[str, Any]) -> None:
        queued.append((job, info))
        try:
            shards.add(job.key, latent, base | info | {"source": str(job.source)})
        except ShardWriteError as err:  # the queued items, reported done, went down with the shard
            earlier = [queued_job for queued_job, _ in queued[:-1]]
            queued.clear()
            raise LostWrites(err.problem, err.path, earlier) from err
        if len(queued) >= int(settings.shard_size or 1):  # add() has written the shard
            published()

    def close() -> None:
        shards.close()
        published()

    return Sink(write, lambda job: job.key in done, close)


def latent_sink(settings: EncodeSettings, base: dict[str, Any], manifest: ManifestWriter | None, skip: set[str]) -> Sink:
    """One .safetensors per image, or shards with an index (shard_size); each write is recorded in the manifest.

    `skip`: keys of file outputs already there with this run's provenance (shards find theirs in the index).
    """

    def record(job: Job, output: Path, size: int | None, info: dict[str, Any]) -> None:
        if manifest is not None:
            manifest.record(job.source, output, "written", size=size, key=job.key, image_size=info["original_size"])

    make = _file_sink if settings.shard_size is None else _shard_sink
    return make(settings, base, record, skip)


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
    run: RunOptions | None = None,
    *,
    manifest: ManifestWriter | None = None,
) -> Summary:
    """Encode image files to latent files (skipping this run's existing outputs); bad files fail alone. Returns the Summary.

    Existing outputs of other settings stop the run before any work (StaleOutputError) unless settings.overwrite.
    """
    from vaetool.io.atomic import remove_stale_temps

    run = run or RunOptions()
    prepare_output(settings.out_dir)  # before any image is encoded
    provenance = encode_provenance(vae, settings, run.tiling)
    jobs = image_jobs(inputs, settings)
    skip: set[str] = set()
    if not settings.overwrite:
        if settings.shard_size is None:
            skip = existing_outputs(jobs, provenance, settings.out_dir)
        else:
            check_shards(settings, provenance)
    remove_stale_temps(settings.out_dir)  # temp files of killed runs
    sink = latent_sink(settings, run_metadata(vae, settings) | {"provenance": provenance}, manifest, skip)
    if manifest is not None:
        manifest.start_run(run_settings(settings, provenance, len(jobs)))
    fallback = Fp32Fallback(vae, run.on_notice)

    def compute(images: torch.Tensor, jobs: Sequence[Job]) -> torch.Tensor:
        keys = [j.key for j in jobs]
        return fallback(lambda v: latents_of(v, images, keys, settings, run))

    def on_event(event: Event) -> None:
        if manifest is not None and event.kind != "done":
            if event.kind == "failed":
                manifest.record(event.job.source, None, "failed", error=event.reason, key=event.job.key)
            else:
                manifest.record(event.job.source, event.job.output, "skipped", key=event.job.key,
                                reason=event.reason or "already there with this run's settings")
        if run.on_event is not None:
            run.on_event(event)

    stages = Stages(
        load=image_loader(settings, vae.downscale, pin=vae.device.type == "cuda"),
        compute=compute,
        write=sink.write,
        skip=sink.exists,
    )
    engine = replace(engine_options(vae, "encode", run), on_event=on_event)
    try:
        summary = run_pipeline(jobs, stages, engine)
    finally:
        sink.close()
    summary.fp32_retries = fallback.retries
    return summary


def run_settings(settings: EncodeSettings, provenance: dict[str, Any], inputs: int) -> dict[str, Any]:
    """The settings of a run, for its manifest header: the provenance, where it writes, and how."""
    rank, world = rank_and_world()
    return {"command": "encode", **provenance, "inputs": inputs, "output": str(settings.out_dir), "shard_size": settings.shard_size,
            "overwrite": settings.overwrite, "alpha": settings.alpha, "background": list(settings.background), "rank": rank,
            "world_size": world}


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size from torchrun's environment ((0, 1) when not under it)."""
    return int(os.environ.get("RANK", "0")), max(1, int(os.environ.get("WORLD_SIZE", "1")))


def finish_ranks(manifest: Path, rank: int, world: int, shard_dir: Path | None = None) -> None:
    """Under torchrun: wait for every rank (a gloo barrier); rank 0 merges the manifest parts and shard indexes."""
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
    dist.destroy_process_group()
