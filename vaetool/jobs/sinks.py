"""Where encoded latents go, one Sink per output format (`--format`):

- `vaetool`: one .safetensors per image mirroring the input tree, or shards with an index (`shard_size`);
- `sd-scripts`, `musubi`: the trainers' own cache files (vaetool.io.trainer_writers), named as the
  trainer looks for them, with this run's provenance inside so a rerun skips them;
- `webdataset`: one tar per input shard (vaetool.jobs.encode_tars), members `KEY.latent.safetensors`
  and `KEY.json`, the sample's other members carried over.

A Sink's `write` runs on the pipeline's writer thread; `exists` answers the resume question before
an image is loaded; `close` publishes what is queued (shards, tars).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import torch

from vaetool.errors import OutputError, OutputExistsError
from vaetool.io.trainer_writers import TRAINER_FORMATS, TrainerFormat, read_provenance
from vaetool.jobs.provenance import StaleOutputs, check_output, latent_provenance, mismatch
from vaetool.pipeline import AlreadyWritten, Job, LostWrites

if TYPE_CHECKING:
    from vaetool.families import LatentFormat
    from vaetool.io.manifest import ManifestWriter
    from vaetool.jobs.encode import EncodeSettings

__all__ = [
    "LATENT_SUFFIX", "OUTPUT_FORMATS", "TRAINER_OUTPUTS", "Sink", "check_shards", "existing_outputs", "job_outputs", "latent_sink",
    "output_files", "written_meanwhile",
]  # fmt: skip

LATENT_SUFFIX = ".safetensors"  # vaetool's own latent files
TRAINER_OUTPUTS = tuple(TRAINER_FORMATS)  # formats whose files a trainer reads: sd-scripts, musubi
OUTPUT_FORMATS = ("vaetool", "webdataset", *TRAINER_OUTPUTS)  # --format


@dataclass(frozen=True)
class Sink:
    """Where latents go: `write` (writer thread), `exists` (skip on resume: this run's own), `close` (write what is queued)."""

    write: Callable[[Job, torch.Tensor, dict[str, Any]], Any]
    exists: Callable[[Job], bool]
    close: Callable[[], None]


def output_files(settings: EncodeSettings) -> tuple[str, Callable[[Path], Any]]:
    """The suffix of settings.format's per-file outputs and the reader of the provenance they record."""
    if settings.format in TRAINER_OUTPUTS:
        return TRAINER_FORMATS[settings.format].suffix, read_provenance
    return LATENT_SUFFIX, latent_provenance


def job_outputs(settings: EncodeSettings, job: Job, family: str) -> list[Path]:
    """The per-file outputs already there for a job: its latent file, or its trainer caches whatever size they name."""
    output = Path(str(job.output))
    if settings.format in TRAINER_OUTPUTS:
        return trainer_glob(TRAINER_FORMATS[settings.format], output, family)
    return [output] if output.exists() else []


def existing_outputs(jobs: Sequence[Job], settings: EncodeSettings, family: str, provenance: dict[str, Any]) -> set[str]:
    """Keys of the jobs whose per-file output exists with this provenance; StaleOutputError when others exist (headers only)."""
    _, read = output_files(settings)
    stale, ours = StaleOutputs(), set()
    for job in jobs:
        for output in job_outputs(settings, job, family):
            reason = check_output(output, provenance, read)
            if reason is None:
                ours.add(job.key)
            else:
                stale.add(output, reason)
    stale.raise_if_any(settings.out_dir)
    return ours


def written_meanwhile(output: Path, provenance: dict[str, Any], read: Callable[[Path], Any] = latent_provenance) -> NoReturn:
    """An output another process published while this one computed it: AlreadyWritten (skipped) when it is this run's."""
    reason = check_output(output, provenance, read)
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


def trainer_glob(trainer: TrainerFormat, stem_path: Path, family: str) -> list[Path]:
    """The trainer cache files of one image, whatever size their names record ({stem}_*x*_{arch}{suffix})."""
    import glob

    named = trainer.file_name(stem_path.name, (0, 0), family)  # cat_0000x0000_sdxl.npz
    pattern = glob.escape(named).replace("_0000x0000_", "_[0-9]*x[0-9]*_", 1)
    return sorted(stem_path.parent.glob(pattern))


def _trainer_sink(
    settings: EncodeSettings, base: dict[str, Any], record: Callable[..., None], skip: set[str], latent_format: LatentFormat
) -> Sink:
    """One trainer cache per image (sd-scripts .npz, musubi .safetensors), named by the image's size as the trainer looks."""
    trainer, family = TRAINER_FORMATS[settings.format], base["family"]
    provenance = json.dumps(base["provenance"], sort_keys=True)

    def write(job: Job, latent: torch.Tensor, info: dict[str, Any]) -> Path:
        stem_path = Path(str(job.output))  # out_dir / rel without its suffix; the name gets the size and architecture
        hw = (int(info["original_size"][0]), int(info["original_size"][1]))
        output = stem_path.with_name(trainer.file_name(stem_path.name, hw, family))
        try:
            trainer.write(output, latent, latent_format, hw, overwrite=settings.overwrite, provenance=provenance)
        except OutputExistsError:
            written_meanwhile(output, base["provenance"], read_provenance)
        record(job, output, output.stat().st_size, info)
        return output

    return Sink(write, lambda job: job.key in skip, lambda: None)


def latent_sink(
    settings: EncodeSettings, base: dict[str, Any], manifest: ManifestWriter | None, skip: set[str], latent_format: LatentFormat
) -> Sink:
    """The Sink of settings.format (vaetool files or shards, a trainer's caches); each write is recorded in the manifest.

    `skip`: keys of file outputs already there with this run's provenance (shards find theirs in the index).
    """

    def record(job: Job, output: Path, size: int | None, info: dict[str, Any]) -> None:
        if manifest is not None:
            manifest.record(job.source, output, "written", size=size, key=job.key, image_size=info["original_size"])

    if settings.format != "vaetool":
        return _trainer_sink(settings, base, record, skip, latent_format)
    make = _file_sink if settings.shard_size is None else _shard_sink
    return make(settings, base, record, skip)


