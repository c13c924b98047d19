"""Encode WebDataset tar shards (local tars, brace ranges, `pipe:` commands), resumable by shard.

Each input shard streams through the same engine as image files (vaetool.io.webdataset reads one
sample at a time; a bad member fails alone, a truncated tar fails its remainder and the next shard
goes on). Outputs, by --format:

- `webdataset`: one tar per input shard under the output folder, same name (`data-0003.tar`),
  published atomically when the shard is done; members `KEY.latent.safetensors` (a vaetool latent
  file) and `KEY.json` (the input's JSON object, if any, plus a "vaetool" object with the latent's
  metadata and provenance); the sample's other members (`.txt`, `.cls`, ...) carried over unchanged,
  an input JSON that is not an object as `KEY.source.json`.
- `vaetool`, `sd-scripts`, `musubi`: one file per sample under `OUTPUT/{shard name}/`, the `.txt`
  and `.json` members written beside it (sd-scripts and musubi read captions there).

Resume: the shard index (`shards.json`, or `shards.rank{r}.json` per torchrun rank, merged by rank 0)
records every finished shard; a finished shard whose tar is there is skipped without reading its
input. A tar without a record (a kill between publishing it and the index) is adopted when its
first record carries this run's provenance. Under torchrun whole shards go to ranks (shards[rank::world]);
a dead rank's shards have no record and are redone by the next run.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, cast

import torch

from vaetool.errors import InputError, UsageError
from vaetool.io.atomic import atomic_write
from vaetool.io.tar_index import read_tar_index, write_tar_index
from vaetool.jobs.common import RunOptions, engine_options, prepare_output
from vaetool.jobs.encode import (
    EncodeSettings,
    check_model,
    encode_provenance,
    encode_stage,
    image_loader,
    manifest_events,
    run_metadata,
)  # fmt: skip
from vaetool.jobs.provenance import StaleOutputs, check_output, mismatch
from vaetool.jobs.sinks import LATENT_SUFFIX, Sink, job_outputs, latent_sink, output_files
from vaetool.pipeline import Failure, Job, Stages, Summary, run_pipeline
from vaetool.precision import Fp32Fallback

if TYPE_CHECKING:
    from vaetool.api import Vae
    from vaetool.io.manifest import ManifestWriter

__all__ = [
    "SampleJob", "ShardRead", "encode_tar_shards", "per_file_output", "shard_output_names",
]  # fmt: skip

SIDECARS = ("txt", "json")  # members written beside per-file outputs
TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar")


@dataclass(frozen=True)
class SampleJob(Job):
    """A job for one tar sample: its image bytes, the other members, and its key inside the shard."""

    data: bytes | None = None
    extras: tuple[tuple[str, bytes], ...] = ()
    sample_key: str = ""
    error: str | None = None  # a sample the reader could not use: its load fails with this reason


def _output_name(spec: str) -> str:
    """A shard's output tar name: its file name as .tar (data-0003.tar.gz -> data-0003.tar); for pipe: the .tar it names."""
    if spec.startswith("pipe:"):
        names = [t for t in re.split(r"[\s'\"]+", spec[5:]) if any(t.endswith(s) for s in TAR_SUFFIXES)]
        if not names:
            import hashlib

            return f"pipe-{hashlib.sha256(spec.encode()).hexdigest()[:12]}.tar"
        spec = names[-1]
    name = PurePosixPath(spec.rsplit("?", 1)[0]).name
    stem = next((name[: -len(s)] for s in TAR_SUFFIXES if name.endswith(s)), name)
    if not stem or stem.startswith("."):
        raise UsageError(f"cannot name an output after the shard {spec!r}")
    return stem + ".tar"


def shard_output_names(shards: Sequence[str]) -> dict[str, str]:
    """{input shard: output tar name}; two shards that would share an output name are a usage error."""
    names: dict[str, str] = {}
    seen: dict[str, str] = {}
    for spec in shards:
        name = _output_name(spec)
        if name in seen and seen[name] != spec:
            raise UsageError(f"the shards {seen[name]!r} and {spec!r} would both write {name}: give shards with distinct names")
        seen[name], names[spec] = spec, name
    return names


def _tar_provenance(path: Path) -> Any:
    """The provenance recorded in the first KEY.json of a vaetool webdataset tar (None: none there)."""
    import tarfile

    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".json") and not member.name.endswith(".source.json"):
                    f = tar.extractfile(member)
                    return json.loads(f.read(2**24)).get("vaetool", {}).get("provenance") if f else None
    except (tarfile.TarError, OSError, ValueError, AttributeError) as err:
        raise InputError(f"unreadable output tar: {err}", path) from None
    return None


def _finished(settings: EncodeSettings, names: dict[str, str], indexes: dict[Path, dict[str, Any]],
              provenance: dict[str, Any]) -> set[str]:
    """Input shards whose output is complete with this run's provenance; StaleOutputError when others are there."""
    stale, done, records = StaleOutputs(), set(), {}
    for path, index in indexes.items():
        if index["shards"] and (reason := mismatch(index.get("provenance"), provenance)) is not None:
            stale.add(path, reason)
        records |= index["shards"]
    for spec, name in names.items():
        output = settings.out_dir / name
        if settings.format == "webdataset" and output.exists():
            reason = check_output(output, provenance, _tar_provenance)
            if reason is not None:
                stale.add(output, reason)
            else:  # published atomically when its shard was done: a tar there is a finished shard
                done.add(spec)
        elif settings.format != "webdataset" and records.get(name, {}).get("complete"):
            done.add(spec)
    stale.raise_if_any(settings.out_dir)
    return done


def _tar_samples(path: Path) -> int:
    """How many samples (distinct keys: the member path up to the first dot of its name) a tar holds."""
    with tarfile.open(path) as tar:
        return len({str(PurePosixPath(m.name).parent / m.name.rsplit("/", 1)[-1].split(".", 1)[0]) for m in tar if m.isfile()})


def _adopt(settings: EncodeSettings, names: dict[str, str], done: set[str], indexes: dict[Path, dict[str, Any]],
           index: dict[str, Any]) -> bool:  # fmt: skip
    """Record in this rank's `index` the finished tars no index records (a kill between a tar and its record)."""
    if settings.format != "webdataset":
        return False
    recorded = {name for ix in indexes.values() for name in ix["shards"]}
    adopted = {names[spec]: spec for spec in done if names[spec] not in recorded}
    for name, spec in adopted.items():  # the killed run's failures of that shard are in its manifest, not here
        index["shards"][name] = {"input": spec, "complete": True, "samples": _tar_samples(settings.out_dir / name),
                                 "failed": [], "adopted": True}  # fmt: skip
    return bool(adopted)


class ShardRead:
    """The jobs of one shard, read lazily; `fatal` is set when the shard itself could not be read to its end.

    `output(sample_key)`: the job's output path (None: the sink names it, as a tar member).
    """

    def __init__(self, spec: str, name: str, output: Callable[[str], Path | None]) -> None:
        self.spec, self.name, self.output = spec, name, output
        self.fatal: str | None = None

    def __iter__(self) -> Iterator[SampleJob]:
        """SampleJobs keyed `{shard name}/{sample key}`; unusable samples as jobs that fail with the reader's reason."""
        from vaetool.io.webdataset import BadSample, iter_samples

        try:
            for sample in iter_samples(self.spec):
                key = f"{self.name}/{sample.key}"
                if isinstance(sample, BadSample):
                    if sample.fatal:
                        self.fatal = sample.reason
                    yield SampleJob(key, Path(f"{self.spec}:{sample.member or sample.key}"), None, sample_key=sample.key,
                                    error=sample.reason)
                    continue
                yield SampleJob(key, Path(f"{self.spec}:{sample.image_member}"), self.output(sample.key), data=sample.image,
                                extras=tuple(sorted(sample.extras.items())), sample_key=sample.key)
        except InputError as err:  # the shard cannot be opened at all: it fails alone, the next shard goes on
            self.fatal = err.problem
            yield SampleJob(f"{self.name}/", Path(self.spec), None, error=err.problem)


def per_file_output(out_dir: Path, name: str, suffix: str | None) -> Callable[[str], Path | None]:
    """Outputs of a shard's samples as files: OUT/{shard name without .tar}/{key}{suffix} (suffix None: the tar sink names them)."""
    folder = out_dir / name.removesuffix(".tar")
    return lambda key: None if suffix is None else folder / (key + suffix)


def _tar_json(job: SampleJob, meta: dict[str, Any]) -> tuple[bytes, dict[str, bytes]]:
    """KEY.json for a sample (its input JSON object plus "vaetool"), and the members carried over unchanged."""
    extras = dict(job.extras)
    carried = {ext: data for ext, data in extras.items() if ext != "json" and not ext.startswith("latent.")}
    record: dict[str, Any] = {}
    if "json" in extras:
        try:
            value = json.loads(extras["json"])
        except (ValueError, UnicodeDecodeError):
            value = None
        if isinstance(value, dict) and "vaetool" not in value:
            record = value
        else:
            carried["source.json"] = extras["json"]
    record["vaetool"] = meta
    return json.dumps(record, sort_keys=True, ensure_ascii=False).encode(), carried


class _TarSink:
    """Appends each sample's members to the shard's output tar; `publish` commits it and then records the samples."""

    def __init__(self, path: Path, base: dict[str, Any], manifest: ManifestWriter | None) -> None:
        from vaetool.io.webdataset import TarWriter

        self.path, self.base, self.manifest = path, base, manifest
        self.tar = TarWriter(path, overwrite=True)  # _finished decided: a tar there is another run's only with --overwrite
        self.written: list[tuple[Path, str, list[int]]] = []  # (source, key, image size): recorded once the tar is published

    def write(self, job: Job, latent: torch.Tensor, info: dict[str, Any]) -> Path:
        """Add KEY.latent.safetensors, KEY.json and the carried members of one sample (writer thread)."""
        from vaetool.io.latents import latent_bytes

        job = cast(SampleJob, job)  # only sample jobs reach this sink
        meta = self.base | info | {"source": str(job.source), "key": job.sample_key}
        member_json, carried = _tar_json(job, meta)
        self.tar.add(f"{job.sample_key}.latent.safetensors", latent_bytes(latent, meta))
        self.tar.add(f"{job.sample_key}.json", member_json)
        for ext, data in sorted(carried.items()):
            self.tar.add(f"{job.sample_key}.{ext}", data)
        self.written.append((job.source, job.key, list(info["original_size"])))
        return self.path

    def publish(self) -> None:
        """Commit the tar (atomically), then record its samples in the manifest."""
        self.tar.commit()
        if self.manifest is not None:
            for source, key, size in self.written:
                self.manifest.record(source, self.path, "written", key=key, image_size=size)


def _with_sidecars(sink: Sink, settings: EncodeSettings) -> Sink:
    """Per-file outputs of tar samples: write the sample's .txt/.json beside the latent (a caption for the trainer)."""

    def write(job: Job, latent: torch.Tensor, info: dict[str, Any]) -> Any:
        result = sink.write(job, latent, info)
        if isinstance(job, SampleJob) and job.output is not None:
            stem = Path(str(job.output)).parent / job.sample_key.rsplit("/", 1)[-1]
            for ext, data in job.extras:
                if ext in SIDECARS:
                    side = stem.with_name(f"{stem.name}.{ext}")
                    atomic_write(side, lambda tmp, d=data: tmp.write_bytes(d), overwrite=True)
        return result

    return replace(sink, write=write)


def _existing_files(settings: EncodeSettings, family: str, provenance: dict[str, Any]) -> Callable[[Job], bool]:
    """Skip test for per-file outputs: True when the sample's output is there with this run's provenance.

    Another run's output (other settings) is not skipped: the write then fails that sample, naming the file
    (check_folders has stopped the run before any work for those already there when it started).
    """

    _, read = output_files(settings)

    def ours(job: Job) -> bool:
        if job.output is None or settings.overwrite:
            return False
        found = job_outputs(settings, job, family)
        return bool(found) and all(check_output(output, provenance, read) is None for output in found)

    return ours


def check_folders(settings: EncodeSettings, names: dict[str, str], provenance: dict[str, Any]) -> None:
    """StaleOutputError, before any work, when a shard's output folder holds per-file outputs of other settings."""
    suffix, read = output_files(settings)
    stale = StaleOutputs()
    for name in names.values():
        folder = settings.out_dir / name.removesuffix(".tar")
        for output in sorted(folder.rglob(f"*{suffix}")) if folder.is_dir() else []:
            if (reason := check_output(output, provenance, read)) is not None:
                stale.add(output, reason)
    stale.raise_if_any(settings.out_dir)


def _add(s: Summary, part: Summary) -> None:
    s.total += part.total
    s.done += part.done
    s.skipped += part.skipped
    s.failed += part.failed
    s.batches += part.batches
    s.fp32_retries += part.fp32_retries
    s.seconds += part.seconds
    s.compute_seconds += part.compute_seconds
    s.stopped = s.stopped or part.stopped


def encode_tar_shards(
    vae: Vae,
    shards: Sequence[str],
    settings: EncodeSettings,
    run: RunOptions | None = None,
    *,
    manifest: ManifestWriter | None = None,
    index_name: str = "shards.json",
    on_shard: Callable[[str, str], None] | None = None,
) -> Summary:
    """Encode the samples of tar shards (this rank's share already chosen); finished shards are skipped. Returns the Summary.

    `on_shard(spec, what)` hears "skipped" (finished before) or "done" for each shard.
    """
    from vaetool.io.atomic import remove_stale_temps

    run = run or RunOptions()
    check_model(vae, settings)  # usage errors before the output folder is made
    names = shard_output_names(shards)
    prepare_output(settings.out_dir)
    provenance = encode_provenance(vae, settings, run.tiling)
    index_path = settings.out_dir / index_name
    indexes = {path: read_tar_index(path) for path in {settings.out_dir / "shards.json", index_path}}  # merged, and this rank's
    index = indexes[index_path]
    done = set() if settings.overwrite else _finished(settings, names, indexes, provenance)
    if _adopt(settings, names, done, indexes, index):
        write_tar_index(index_path, index)
    if settings.format != "webdataset" and not settings.overwrite:
        check_folders(settings, {spec: name for spec, name in names.items() if spec not in done}, provenance)
    remove_stale_temps(settings.out_dir)
    index["provenance"] = provenance
    base = run_metadata(vae, settings) | {"provenance": provenance}
    if manifest is not None:
        manifest.start_run({"command": "encode", **provenance, "shards": len(shards), "output": str(settings.out_dir),
                            "format": settings.format, "overwrite": settings.overwrite})
    fallback = Fp32Fallback(vae, run.on_notice)
    compute = encode_stage(settings, run, fallback)
    totals = Summary()
    engine = replace(engine_options(vae, "encode", run), on_event=manifest_events(manifest, run))
    load = image_loader(settings, vae.downscale, vae.device.type == "cuda")
    for spec, name in names.items():
        if spec in done:
            if on_shard is not None:
                on_shard(spec, "skipped")
            continue
        tar = _TarSink(settings.out_dir / name, base, manifest) if settings.format == "webdataset" else None
        if tar is not None:
            sink = Sink(tar.write, lambda job: False, lambda: None)
        else:
            sink = _with_sidecars(latent_sink(settings, base, manifest, set(), vae.latent_format), settings)
            sink = replace(sink, exists=_existing_files(settings, vae.latent_format.family, provenance))
        stages = Stages(load=load, compute=compute, write=sink.write, skip=sink.exists)
        try:
            suffix = {"webdataset": None, "vaetool": LATENT_SUFFIX}.get(settings.format, "")  # trainers: the stem, named at write
            read = ShardRead(spec, name, per_file_output(settings.out_dir, name, suffix))
            part = run_pipeline(read, stages, engine)
            sink.close()
        except BaseException:
            if tar is not None:
                tar.tar.abort()
            raise
        if part.stopped or read.fatal is not None:  # not finished: no tar, no record; the next run redoes the shard
            if tar is not None:
                tar.tar.abort()
                part.failed += [Failure(key, str(source), "its shard's tar was not written (the "
                                        "shard could not be read to its end): redone by the next run")
                                for source, key, _ in tar.written]
                part.done -= len(tar.written)
            _add(totals, part)
            if part.stopped:
                break
            continue
        _add(totals, part)
        if tar is not None:
            tar.publish()
        index["shards"][name] = {"input": spec, "complete": True, "samples": part.done + part.skipped,
                                 "failed": [{"key": f.key, "reason": f.reason} for f in part.failed]}
        write_tar_index(index_path, index)
        if on_shard is not None:
            on_shard(spec, "done")
    totals.fp32_retries = fallback.retries
    return totals
