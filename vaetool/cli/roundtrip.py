"""`vaetool roundtrip IMAGES... -o DIR`: images -> latents -> images in memory, with metrics and golden checks.

Every image is encoded (posterior mode) and decoded in batches of equal size through the streaming
engine, cropped back to its size and written as an 8-bit PNG under DIR (the input tree mirrored,
always replaced: the outputs are this run's measurements). PSNR, SSIM and max abs diff against the
input are computed on the 8-bit images as written. With --golden DIR each output is compared with
its stored golden against --min-psnr/--min-ssim/--max-diff, a failure gets a heatmap under
DIR/heatmaps/, and any regression exits 1; --update-golden rewrites the goldens that no longer pass
(--force: all) instead. --html writes a self-contained page of the run (vaetool.report_html).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import torch
import typer

from vaetool.cli import app_state
from vaetool.cli.decode import latent_decoder, png_text, usage_error
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
from vaetool.golden import NO_THRESHOLDS, GoldenResult, Status, Thresholds
from vaetool.metrics import ImageMetrics
from vaetool.pipeline import (
    HALF_DTYPES,
    EngineOptions,
    Event,
    Job,
    Loaded,
    Stages,
    Summary,
    encoder_moments,
    fp32_copy,
    run_pipeline,
)
from vaetool.report import Case

if TYPE_CHECKING:
    from vaetool.api import Vae
    from vaetool.io.inputs import InputFile

NAME = "roundtrip"
HELP = "Encode and decode images in memory: PSNR/SSIM/max diff per image, and golden-image regression runs for CI."

SUFFIX = ".png"
HEATMAP_DIR = "heatmaps"
SUITE = "vaetool roundtrip"


@dataclass(frozen=True)
class RoundtripSettings:
    """Where outputs go and what is checked: goldens (compare or update), thresholds."""

    out_dir: Path
    golden: Path | None = None
    update_golden: bool = False
    thresholds: Thresholds = NO_THRESHOLDS  # against the golden with --golden, else against the input
    force: bool = False  # with update_golden: rewrite goldens that still pass too


@dataclass
class ImageResult:
    """What happened to one image: its output, metrics against the input, and its golden check."""

    key: str
    source: Path
    output: Path | None = None
    size: tuple[int, int] | None = None  # (height, width)
    vs_input: ImageMetrics | None = None
    golden: GoldenResult | None = None
    reasons: list[str] = field(default_factory=list)  # broken limits (against the golden, or the input)
    limits: list[str] = field(default_factory=list)  # their names: psnr, ssim, max_diff
    heatmap: Path | None = None
    error: str | None = None

    @property
    def status(self) -> str:
        """error, failed, missing (no golden), updated, unchanged, passed (limits checked) or ok (nothing to check)."""
        if self.error is not None:
            return "error"
        if self.golden is not None and self.golden.status is not Status.passed:
            return self.golden.status.value
        if self.reasons:
            return "failed"
        return "passed" if self.golden is not None else "ok"

    @property
    def ok(self) -> bool:
        """False for errors, regressions and missing goldens."""
        return self.status in ("passed", "updated", "unchanged", "ok")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (paths as strings, infinite PSNR as null)."""
        g = self.golden
        return {
            "image": self.key,
            "source": str(self.source),
            "output": None if self.output is None else str(self.output),
            "height": None if self.size is None else self.size[0],
            "width": None if self.size is None else self.size[1],
            "status": self.status,
            "vs_input": None if self.vs_input is None else self.vs_input.as_dict(),
            "vs_golden": None if g is None or g.metrics is None else g.metrics.as_dict(),
            "golden": None if g is None else str(g.golden),
            "reasons": self.reasons,
            "limits_broken": self.limits,
            "heatmap": None if self.heatmap is None else str(self.heatmap),
            "error": self.error,
        }

    def case(self) -> Case:
        """The JUnit test case of this image."""
        details = {k: v for k, v in self.as_dict().items() if k not in ("image", "reasons", "limits_broken", "error")}
        failed = self.status in ("failed", "missing")
        return Case(self.key, failures=tuple(self.reasons) if failed else (), error=self.error, output=json.dumps(details, indent=2))


def _reference_loader(vae: Vae, settings: RoundtripSettings) -> Callable[[Job], Loaded]:
    """The load stage of encode (read, pad to the downscale), plus the input as 8-bit pixels for the metrics."""
    from vaetool.cli.encode import EncodeSettings, image_loader
    from vaetool.io.images import crop_to, to_uint8

    load_padded = image_loader(EncodeSettings(out_dir=settings.out_dir), vae.downscale)

    def load(job: Job) -> Loaded:
        loaded = load_padded(job)
        h, w = loaded.info["original_size"]
        loaded.info["reference"] = to_uint8(crop_to(loaded.tensor, (h, w)))  # [h, w, 3] uint8
        return loaded

    return load


def roundtrip_stages(vae: Vae, settings: RoundtripSettings, compute: ComputeOptions) -> Stages[Job]:
    """load: read and pad; compute: encode (posterior mode) then decode; write: PNG, metrics, golden check."""
    from vaetool import golden
    from vaetool.cli.encode import EncodeSettings, encode_compute
    from vaetool.io.images import crop_to, save_png, to_uint8
    from vaetool.metrics import compare

    def make(model: Vae) -> Callable[[torch.Tensor, Sequence[Job]], torch.Tensor]:
        moments = encoder_moments(compute.tile.value, compute.tile_size, compute.max_memory)(model)
        encode = encode_compute(model, EncodeSettings(out_dir=settings.out_dir), moments)
        decode = latent_decoder(compute)(model)
        return lambda images, jobs: decode(encode(images, jobs))  # [B, 3, H, W] -> [B, 3, H, W]

    fp32: list[Callable[[torch.Tensor, Sequence[Job]], torch.Tensor]] = []

    def fallback(images: torch.Tensor, jobs: Sequence[Job]) -> torch.Tensor:
        fp32[:] = fp32 or [make(fp32_copy(vae))]  # built on the first non-finite batch only
        return fp32[0](images, jobs)

    def write(job: Job, image: torch.Tensor, info: dict[str, Any]) -> ImageResult:
        h, w = info["original_size"]
        decoded = crop_to(image, (h, w))  # [3, h, w]
        pixels = to_uint8(decoded)  # [h, w, 3], exactly what the PNG holds
        output = Path(str(job.output))
        text = png_text(vae, str(job.source), **{"vaetool.roundtrip": "encode (posterior mode), decode"})
        save_png(output, decoded, bits=8, text=text, overwrite=True)
        result = ImageResult(job.key, job.source, output, (h, w), compare(pixels, info["reference"]))
        reference = info["reference"]
        if settings.golden is not None:
            target = golden.golden_path(settings.golden, Path(job.key))
            if settings.update_golden:
                result.golden = golden.update(pixels, target, text, settings.thresholds, force=settings.force)
            else:
                result.golden = golden.check(pixels, target, settings.thresholds)
            result.reasons, result.limits, reference = result.golden.reasons, result.golden.broken, result.golden.reference
        else:
            broken = settings.thresholds.broken(result.vs_input)
            result.reasons, result.limits = list(broken.values()), list(broken)
        heat = settings.out_dir / HEATMAP_DIR / Path(job.key).with_suffix(SUFFIX)
        if result.status == "failed" and reference is not None and reference.shape == pixels.shape:
            against = "golden" if settings.golden is not None else "input"
            result.heatmap = golden.write_heatmap(heat, pixels, reference, {"vaetool.source": str(job.source), "vaetool.against": against})
        elif result.ok:
            heat.unlink(missing_ok=True)  # a heatmap of an earlier failed run no longer applies
        return result

    return Stages(
        load=_reference_loader(vae, settings),
        compute=make(vae),
        write=write,
        fallback=fallback if vae.dtype in HALF_DTYPES else None,
    )


def roundtrip_files(
    vae: Vae, files: Sequence[InputFile], settings: RoundtripSettings, compute: ComputeOptions, engine: EngineOptions
) -> tuple[list[ImageResult], Summary]:
    """Round-trip every image; results in input order (images that could not be processed carry their error)."""
    from vaetool.io.inputs import output_path

    done: dict[str, ImageResult] = {}
    chained = engine.on_event

    def on_event(event: Event) -> None:
        if event.kind == "done":
            done[event.job.key] = event.result
        if chained is not None:
            chained(event)

    jobs = [Job(f.rel.as_posix(), f.path, output_path(f, settings.out_dir, SUFFIX)) for f in files]
    summary = run_pipeline(jobs, roundtrip_stages(vae, settings, compute), dataclasses.replace(engine, on_event=on_event))
    failed = {f.key: f.reason for f in summary.failed}
    results = []
    for job in jobs:
        if job.key in done:
            results.append(done[job.key])
        elif job.key in failed:
            results.append(ImageResult(job.key, job.source, error=f"{job.source}: {failed[job.key]}"))
    return results, summary


def build_report(vae: Vae, results: Sequence[ImageResult], settings: RoundtripSettings, summary: Summary) -> dict[str, Any]:
    """The JSON report: model, settings, every image, overall figures, counts and the verdict."""
    from vaetool import __version__
    from vaetool.metrics import pooled

    golden_metrics = [r.golden.metrics for r in results if r.golden is not None and r.golden.metrics is not None]
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    return {
        "vaetool_version": __version__,
        "model": json.loads(png_text(vae, "")["vaetool.model"]),
        "dtype": str(vae.dtype).removeprefix("torch."),
        "device": str(vae.device),
        "golden": None if settings.golden is None else str(settings.golden),
        "update_golden": settings.update_golden,
        "thresholds": settings.thresholds.as_dict(),
        "thresholds_against": "golden" if settings.golden is not None else "input",
        "images": [r.as_dict() for r in results],
        "overall": {
            "vs_input": pooled([r.vs_input for r in results if r.vs_input is not None]),
            "vs_golden": pooled(golden_metrics) if settings.golden is not None else None,  # with --update-golden: as stored before
        },
        "counts": dict(sorted(counts.items())),
        "passed": all(r.ok for r in results) and not summary.stopped,
        "seconds": round(summary.seconds, 3),
    }


def command(
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the decoded PNGs (input tree mirrored, always replaced) and heatmaps/.", show_default=False)],
    inputs: Annotated[list[str] | None, typer.Argument(help="Image files, folders or quoted globs.", show_default=False)] = None,
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Also take the images in subfolders.")] = False,
    files_from: Annotated[str | None, typer.Option("--files-from", help="Also take the images listed in this file (one per line; - for stdin).")] = None,
    golden: Annotated[Path | None, typer.Option("--golden", help="Folder of golden PNGs to compare the outputs with (same relative paths).")] = None,
    update_golden: Annotated[bool, typer.Option(
        "--update-golden", help="Rewrite the goldens in --golden that no longer pass the limits (and write missing ones) instead of comparing.")] = False,
    force: Annotated[bool, typer.Option("--force", help="With --update-golden: rewrite every golden, also those that still pass.")] = False,
    min_psnr: Annotated[float | None, typer.Option("--min-psnr", help=f"Least PSNR in dB (default with --golden: {Thresholds().min_psnr:g}).")] = None,
    min_ssim: Annotated[float | None, typer.Option("--min-ssim", help=f"Least SSIM (default with --golden: {Thresholds().min_ssim:g}).")] = None,
    max_diff: Annotated[int | None, typer.Option("--max-diff", min=0, max=255, help=f"Largest abs difference in 8-bit levels (default with --golden: {Thresholds().max_diff}).")] = None,
    report_path: Annotated[Path | None, typer.Option("--report", help="Write the JSON report here.")] = None,
    junit: Annotated[Path | None, typer.Option("--junit", help="Write JUnit XML here (one test case per image) for CI.")] = None,
    html: Annotated[Path | None, typer.Option(
        "--html", help="Write a self-contained HTML page here: input, output, golden and heatmap of every image.")] = None,
    fail_fast: Annotated[bool, typer.Option("--fail-fast", help="Stop at the first image that cannot be processed.")] = False,
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
    """Round-trip images through the VAE and report (or check) the quality."""
    from vaetool import report, report_html
    from vaetool.io.inputs import collect_inputs
    from vaetool.pipeline import planned_batch_size

    if not inputs and files_from is None:
        raise usage_error("give image files, folders or globs (or --files-from LIST)")
    if update_golden and golden is None:
        raise usage_error("--update-golden needs --golden DIR")
    if force and not update_golden:
        raise usage_error("--force goes with --update-golden (rewrite every golden)")
    limits = Thresholds() if golden is not None else NO_THRESHOLDS
    limits = Thresholds(*(given if given is not None else default for given, default in
                          zip((min_psnr, min_ssim, max_diff), (limits.min_psnr, limits.min_ssim, limits.max_diff), strict=False)))
    settings = RoundtripSettings(output, golden, update_golden, limits, force)
    files = collect_inputs(inputs or [], recursive=recursive, files_from=files_from)
    opts = ModelOptions(config, checkpoint, model, family, ema, device, dtype, attention)
    compute = ComputeOptions(tile, tile_size, max_memory, batch_size)
    vae = load_model(opts)
    engine = EngineOptions(batch_size=planned_batch_size(vae, "decode", batch_size, max_memory), fail_fast=fail_fast)
    with Reporter(len(files), quiet=quiet, verbose=verbose, label="round trip") as reporter:
        engine = dataclasses.replace(engine, on_event=reporter.event, on_notice=reporter.notice)
        with attention_scope(opts):
            results, summary = roundtrip_files(vae, files, settings, compute, engine)
    doc = build_report(vae, results, settings, summary)
    if report_path is not None:
        report.write_json(report_path, doc)
    if junit is not None:
        properties = {"model": json.dumps(doc["model"], sort_keys=True), "vaetool_version": doc["vaetool_version"],
                      "thresholds": json.dumps(doc["thresholds"]), "golden": str(golden)}
        report.write_junit(junit, SUITE, [r.case() for r in results], properties, summary.seconds)
    if html is not None:
        report_html.write_html(html, doc)
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
    elif not quiet:
        app_state.console.print(report.roundtrip_table(doc))
    for r in results:
        if r.status in ("failed", "missing"):
            where = f" (heatmap: {r.heatmap})" if r.heatmap is not None else ""
            app_state.err_console.print(f"regression: {r.key}: {'; '.join(r.reasons)}{where}", markup=False, highlight=False, soft_wrap=True)
    if not doc["passed"]:
        raise typer.Exit(1)
