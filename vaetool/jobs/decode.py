"""Decode latent files of every kind to PNG images: resumable, bad files skipped.

Inputs are vaetool .safetensors (single or sharded), ComfyUI .latent, .npy, weights-only .pt files
and the trainers' caches (sd-scripts, musubi-tuner, SimpleTuner, OneTrainer); a batch inside one
file becomes name_0.png, name_1.png, ... Each latent is turned to raw form with the scale/shift its
file records (a trainer cache: its format's form, the family from the file or --family; a ComfyUI
file: the form ComfyUI's VAE gives, raw, or for Flux.2 the patchified normalised 128 channels; else
`scaled` with the model's family),
decoded in batches of equal size (tiled when asked or needed), cropped to the recorded original
size, and written as a PNG with its provenance in text chunks, atomically. A rerun skips a PNG only
when its recorded provenance (model, dtype, tiling, bits, the source latent's sha256 and form) is
this run's; other existing PNGs stop the run before any work (vaetool.jobs.provenance). A preview
run (a TAESD standing in for the full decoder, settings.preview) records so in each PNG's provenance.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

import torch

from vaetool.errors import InputError, OutputError, OutputExistsError, VaeToolError
from vaetool.families import LatentFormat, get_family
from vaetool.io.latent_item import LatentItem
from vaetool.jobs.common import RunOptions, engine_options, png_text, prepare_output
from vaetool.jobs.provenance import PNG_KEY, SourceHashes, StaleOutputs, check_output, model_provenance, png_provenance
from vaetool.pipeline import AlreadyWritten, Job, Loaded, Stages, Summary, run_pipeline
from vaetool.precision import Fp32Fallback

if TYPE_CHECKING:
    from vaetool.api import Vae
    from vaetool.io.inputs import InputFile
    from vaetool.tiling import Tiling

__all__ = ["DecodeJob", "DecodeSettings", "decode_files", "jobs_from_files", "original_size", "to_raw"]

SUFFIX = ".png"
# what a file's metadata says about the form of its latents
SCALED_WORDS: dict[str, bool] = {"scaled": True, "raw": False}
SIZE_KEY = "original_size"  # vaetool metadata: [height, width] of the image before padding


@dataclass(frozen=True)
class DecodeSettings:
    """What to write and how to read latents without metadata."""

    out_dir: Path
    scaled: bool | None = None  # the form of latents whose file does not say (None: raw)
    bits: int = 8
    overwrite: bool = False
    family: str | None = None  # the user's --family: the family of trainer caches that do not record one
    preview: bool = False  # the model is a TAESD preview decoder standing in for the full VAE (recorded in each PNG)


@dataclass(frozen=True)
class DecodeJob(Job):
    """One latent to decode (or the reason its file could not be read)."""

    item: LatentItem | None = field(default=None, compare=False)
    error: str | None = None


def file_says_scaled(meta: dict[str, Any]) -> bool | None:
    """Whether a file's metadata marks its latents scaled (True), raw (False), or does not say (None)."""
    if isinstance(meta.get("scaled"), bool):
        return meta["scaled"]
    return SCALED_WORDS.get(str(meta.get("latent_format", "")).lower())


FORMAT_FIELDS = ("scale", "shift", "downscale", "mean", "std", "patch", "stats_from_checkpoint")


def recorded_format(meta: dict[str, Any], fallback: LatentFormat, path: Path) -> LatentFormat:
    """The latent form a file recorded (scale/shift, per-channel mean/std, patch; else its family), else `fallback`."""
    if "scale" in meta:
        fields = {"family": str(meta.get("family", "recorded")), "channels": fallback.channels}
        fields |= {k: meta[k] for k in FORMAT_FIELDS if k in meta}
        try:
            return LatentFormat.from_dict(fields)
        except (TypeError, ValueError) as err:
            raise InputError(f"bad recorded latent form (scale {meta['scale']!r}, shift {meta.get('shift')!r}): {err}", path) from None
    if isinstance(meta.get("family"), str):
        try:
            return get_family(meta["family"])
        except ValueError:
            pass  # an unknown family name: the model's own format
    return fallback


def comfy_form(item: LatentItem, fmt: LatentFormat) -> LatentItem:
    """A ComfyUI latent marked in the form ComfyUI's VAE gives it: raw, except that for a patchified family (Flux.2)
    it gives the patchified, normalised latent (vaetool's scaled form), which a file with those channels holds."""
    if item.metadata.get("source_format") != "comfyui" or fmt.patch == 1 or item.channels != fmt.scaled_channels:
        return item
    return replace(item, metadata={**item.metadata, "scaled": True})


def check_form_channels(item: LatentItem, form: str, vae: Vae) -> None:
    """InputError naming the file when the latent's channels are not those of the form it is read in (raw: the model's;
    scaled: those of the recorded form, which a patchified family multiplies: Flux.2's 32 raw are 128 scaled)."""
    from vaetool.io.latents import check_channels

    fmt = vae.latent_format
    expected = fmt.channels if form == "raw" else recorded_format(item.metadata, fmt, item.source).scaled_channels
    both = f", {form} form" if fmt.scaled_channels != fmt.channels else ""  # say the form where the forms differ
    check_channels(item, expected, f"the model ({fmt.family}{both})")


def latent_form(item: LatentItem, scaled_flag: bool | None) -> str:
    """The form an item is read in: what its file says, else `scaled_flag` (None: raw)."""
    said = file_says_scaled(item.metadata)
    return "scaled" if (said if said is not None else bool(scaled_flag)) else "raw"


def to_raw(item: LatentItem, vae: Vae, scaled_flag: bool | None) -> tuple[torch.Tensor, str]:
    """The item's latent [C, h, w] in raw form and the form its file was in ("raw" or "scaled")."""
    if latent_form(item, scaled_flag) == "raw":
        return item.latent, "raw"
    fmt = recorded_format(item.metadata, vae.latent_format, item.source)
    return fmt.to_raw(item.latent[None])[0], "scaled"  # [C, h, w] (formats convert batches [B, C, h, w])


def original_size(meta: dict[str, Any]) -> tuple[int, int] | None:
    """The (height, width) of the image before padding, when the metadata records it."""
    value = meta.get(SIZE_KEY)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value):
        return int(value[0]), int(value[1])
    return None


def is_tar(path: Path) -> bool:
    """A WebDataset tar of latents (decoded member by member into a folder named after it)."""
    return path.name.lower().endswith(".tar")


def item_name(f: InputFile, item: LatentItem) -> str:
    """The latent's name, with its file's suffix kept when another input shares the stem (a.safetensors, a.npy:
    a.safetensors, a.npy; a batch a.npy: a.npy_0, a.npy_1, ...)."""
    stem = f.path.stem
    if f.keep_suffix and item.name.startswith(stem):
        return f.rel.name + item.name[len(stem):]
    return item.name


def item_output(out_dir: Path, rel: PurePath, item: LatentItem, name: str | None = None) -> Path:
    """out_dir / the input's folder / item name .png; InputError for names that would leave out_dir."""
    name = item.name if name is None else name
    if PurePath(name).is_absolute() or ".." in PurePath(name).parts or not PurePath(name).parts:
        raise InputError(f"latent name {name!r} cannot be an output file name", item.source)
    return out_dir / rel.parent / f"{name}{SUFFIX}"


def jobs_from_files(files: Sequence[InputFile], out_dir: Path) -> Iterator[DecodeJob]:
    """Read each latent file (lazily, in order) into one job per latent; unreadable files become failed jobs."""
    from vaetool.io.latents import load_latents, tar_latents
    from vaetool.video.causal import refuse_in_image_decode

    taken: dict[Path, str] = {}
    for f in files:
        try:
            refuse_in_image_decode(f.path)  # a whole-clip video latent (Wan): `vaetool video decode`
            items = tar_latents(f.path) if is_tar(f.path) else load_latents(f.path)
        except VaeToolError as err:
            yield DecodeJob(f.rel.as_posix(), f.path, None, error=err.problem)
            continue
        for item in items:
            if isinstance(item, tuple):  # a bad member of a tar: it fails alone
                yield DecodeJob((f.rel.parent / item[0]).as_posix(), f.path, None, error=item[1])
                continue
            name = item_name(f, item)
            key = (f.rel.parent / name).as_posix()
            try:
                output = item_output(out_dir, f.rel, item, name)
            except InputError as err:
                yield DecodeJob(key, f.path, None, error=err.problem)
                continue
            if output in taken:
                yield DecodeJob(key, f.path, None, error=f"its output {output} is also the output of {taken[output]}")
                continue
            taken[output] = f"{f.path} [{item.name}]"
            yield DecodeJob(key, f.path, output, item=item)


def decode_provenance(vae: Vae, settings: DecodeSettings, tiling: Tiling) -> dict[str, Any]:
    """What every PNG of a run records (each adds its source latent's sha256 and form): model fields and bits
    (and `preview: true` for a TAESD preview run)."""
    return model_provenance(vae, tiling) | {"bits": settings.bits} | ({"preview": True} if settings.preview else {})


def item_provenance(base: dict[str, Any], item: LatentItem, settings: DecodeSettings, hashes: SourceHashes) -> dict[str, Any]:
    """The provenance of one item's PNG: the run's, its source file's sha256 and the form it is read in."""
    return base | {"source_sha256": hashes(item.source), "latent_form": latent_form(item, settings.scaled)}


def existing_pngs(files: Sequence[InputFile], settings: DecodeSettings, base: dict[str, Any], hashes: SourceHashes,
                  fmt: LatentFormat) -> set[Path]:
    """The outputs already there with this run's provenance; StaleOutputError when others are there.

    Only files whose output folder holds PNGs are read (a second read on a resume; none on a fresh run).
    """
    from vaetool.io.latents import load_latents, tar_latents

    stale, ours, folders = StaleOutputs(), set(), {}
    for f in files:
        folder = settings.out_dir / f.rel.parent
        if is_tar(f.path):  # its PNGs are in a folder named after it
            folder = folder / f.path.name[: -len(".tar")]
        if folder not in folders:
            folders[folder] = folder.is_dir() and any(folder.glob(f"*{SUFFIX}"))
        if not folders[folder]:
            continue
        try:
            items = [i for i in tar_latents(f.path) if isinstance(i, LatentItem)] if is_tar(f.path) else load_latents(f.path)
        except VaeToolError:
            continue  # the run reports it
        for item in items:
            try:
                output = item_output(settings.out_dir, f.rel, item)
            except InputError:
                continue
            if not output.exists():
                continue
            reason = check_output(output, item_provenance(base, comfy_form(item, fmt), settings, hashes), png_provenance)
            if reason is None:
                ours.add(output)
            else:
                stale.add(output, reason)
    stale.raise_if_any(settings.out_dir)
    return ours


def decode_stages(vae: Vae, settings: DecodeSettings, run: RunOptions, fallback: Fp32Fallback, skip: set[Path],
                  hashes: SourceHashes) -> Stages[DecodeJob]:
    """load: check and unscale one latent; compute: decode a batch; write: crop and save one PNG (skip: this run's PNGs)."""
    from vaetool.io.images import crop_to, save_png
    from vaetool.io.trainer_caches import settle_form

    ignored: set[str] = set()
    base = decode_provenance(vae, settings, run.tiling)
    notice: Callable[[str], None] = run.on_notice or (lambda message: None)

    def load(job: DecodeJob) -> Loaded:
        if job.error is not None or job.item is None:
            raise InputError(job.error or "nothing to decode", job.source)
        item = comfy_form(job.item, vae.latent_format)
        item = replace(item, metadata=settle_form(item.metadata, settings.family, vae.latent_format.family, item.source))
        check_form_channels(item, latent_form(item, settings.scaled), vae)
        raw, form = to_raw(item, vae, settings.scaled)
        said = file_says_scaled(item.metadata)
        if settings.scaled is not None and said is not None and said != settings.scaled and form not in ignored:
            ignored.add(form)
            notice(f"{job.source}: the file says its latents are {form}; --{'scaled' if settings.scaled else 'raw'} "
                   "is ignored for files that record their form")
        provenance = item_provenance(base, comfy_form(job.item, vae.latent_format), settings, hashes)  # as existing_pngs does
        extra = {"vaetool.latent_form": form, PNG_KEY: json.dumps(provenance, sort_keys=True)}
        if settings.preview:
            extra["vaetool.preview"] = "TAESD preview decoder, not the full VAE"
        text = png_text(vae, f"{job.source}" + ("" if item.name == job.source.stem else f" [{item.name}]"), **extra)
        return Loaded(raw, {"size": original_size(item.metadata), "text": text, "provenance": provenance})

    def compute(z: torch.Tensor, jobs: Sequence[DecodeJob]) -> torch.Tensor:
        return fallback(lambda v: v.decode(z, tiling=run.tiling, clamp=False).float())  # [B, 3, H, W]

    def write(job: DecodeJob, image: torch.Tensor, info: dict[str, Any]) -> Path:
        size = info["size"]
        if size is not None:
            image = crop_to(image, size)  # [3, h0, w0]
        output = Path(str(job.output))  # jobs without an output failed in load
        try:
            save_png(output, image, bits=settings.bits, text=info["text"], overwrite=settings.overwrite)
        except OutputExistsError:  # another process wrote it since the check
            reason = check_output(output, info["provenance"], png_provenance)
            if reason is None:
                raise AlreadyWritten("written by another run") from None
            raise OutputError(f"{output} was written meanwhile by another run with other settings ({reason})") from None
        except VaeToolError as err:
            problem = err.problem.removeprefix("cannot write: ")
            raise OutputError(f"{err.path}: {problem}" if err.path else problem) from None  # the reason keeps the output's path
        return output

    return Stages(
        load=load,
        compute=compute,
        write=write,
        skip=lambda job: job.output in skip,
    )


def decode_files(vae: Vae, files: Sequence[InputFile], settings: DecodeSettings, run: RunOptions | None = None) -> Summary:
    """Decode every latent of `files` (InputFiles) to PNGs under settings.out_dir; bad ones fail alone.

    Existing PNGs of other settings or another source latent stop the run before any work (StaleOutputError)
    unless settings.overwrite.
    """
    from vaetool.io.atomic import remove_stale_temps

    run = run or RunOptions()
    prepare_output(settings.out_dir)  # before any latent is decoded
    hashes = SourceHashes()
    base = decode_provenance(vae, settings, run.tiling)
    skip = set() if settings.overwrite else existing_pngs(files, settings, base, hashes, vae.latent_format)
    remove_stale_temps(settings.out_dir)  # temp files of killed runs
    fallback = Fp32Fallback(vae, run.on_notice)
    stages = decode_stages(vae, settings, run, fallback, skip, hashes)
    summary = run_pipeline(jobs_from_files(files, settings.out_dir), stages, engine_options(vae, "decode", run))
    summary.fp32_retries = fallback.retries
    return summary
