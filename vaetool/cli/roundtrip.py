"""`vaetool roundtrip IMAGES... -o DIR`: images -> latents -> images in memory, with metrics and golden checks
(vaetool.jobs.roundtrip does the work; vaetool.report draws the table, vaetool.report_html the --html page)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

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
    console,
    load,
    model_spec,
    run_options,
    say,
)  # fmt: skip
from vaetool.errors import InputError, UsageError
from vaetool.thresholds import NO_THRESHOLDS, Thresholds

if TYPE_CHECKING:
    from vaetool.pipeline import Job

NAME = "roundtrip"
HELP = "Encode and decode images in memory: PSNR/SSIM/max diff per image, and golden-image regression runs for CI."

SUITE = "vaetool roundtrip"
_LIMITS = Thresholds()

OutputOpt = Annotated[Path, typer.Option("--output", "-o", show_default=False,
                                         help="Folder for the decoded PNGs (input tree mirrored, always replaced) and heatmaps/.")]
InputsArg = Annotated[list[str] | None, typer.Argument(help="Image files, folders or quoted globs.", show_default=False)]
GoldenOpt = Annotated[Path | None,
                      typer.Option("--golden", help="Folder of golden PNGs to compare the outputs with (same relative paths).")]
UpdateGoldenOpt = Annotated[bool, typer.Option("--update-golden", help="Rewrite the goldens in --golden that no longer pass the "
                                               "limits (and write missing ones) instead of comparing.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="With --update-golden: rewrite every golden, also those that still pass.")]
HtmlOpt = Annotated[Path | None, typer.Option("--html", help="Write a self-contained HTML page here: input, output, golden and "
                                              "heatmap of every image.")]
MinPsnrOpt = Annotated[float | None, typer.Option("--min-psnr", help=f"Least PSNR in dB (default with --golden: {_LIMITS.min_psnr:g}).")]
MinSsimOpt = Annotated[float | None, typer.Option("--min-ssim", help=f"Least SSIM (default with --golden: {_LIMITS.min_ssim:g}).")]
MaxDiffOpt = Annotated[int | None, typer.Option("--max-diff", min=0, max=255,
                                                help=f"Largest abs difference in 8-bit levels (default with --golden: "
                                                f"{_LIMITS.max_diff}).")]
ReportOpt = Annotated[Path | None, typer.Option("--report", help="Write the JSON report here.")]
JunitOpt = Annotated[Path | None, typer.Option("--junit", help="Write JUnit XML here (one test case per image) for CI.")]


def shard_jobs(shards: list[str], out_dir: Path) -> Iterator[Job]:
    """The samples of tar shards as round-trip jobs, read lazily: OUT/{shard name}/{key}.png."""
    from vaetool.jobs.encode_tars import ShardRead, per_file_output, shard_output_names

    for spec, name in shard_output_names(shards).items():
        yield from ShardRead(spec, name, per_file_output(out_dir, name, ".png"))


def command(
    output: OutputOpt,
    inputs: InputsArg = None,
    recursive: RecursiveOpt = False,
    files_from: FilesFromOpt = None,
    golden: GoldenOpt = None,
    update_golden: UpdateGoldenOpt = False,
    force: ForceOpt = False,
    min_psnr: MinPsnrOpt = None,
    min_ssim: MinSsimOpt = None,
    max_diff: MaxDiffOpt = None,
    report_path: ReportOpt = None,
    junit: JunitOpt = None,
    html: HtmlOpt = None,
    fail_fast: FailFastOpt = False,
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
    """Round-trip images through the VAE and report (or check) the quality."""
    from vaetool import report, report_html
    from vaetool.cli.encode import tar_shards
    from vaetool.io.images import IMAGE_SUFFIXES
    from vaetool.io.inputs import collect_inputs
    from vaetool.jobs import RoundtripSettings, attention_scope, build_report, roundtrip_files
    from vaetool.jobs.common import check_writable
    from vaetool.jobs.roundtrip import roundtrip_jobs

    if not inputs and files_from is None:
        raise UsageError("give image files, folders or globs (or --files-from LIST)")
    if update_golden and golden is None:
        raise UsageError("--update-golden needs --golden DIR")
    if force and not update_golden:
        raise UsageError("--force goes with --update-golden (rewrite every golden)")
    limits = Thresholds() if golden is not None else NO_THRESHOLDS
    given = (min_psnr, min_ssim, max_diff)
    defaults = (limits.min_psnr, limits.min_ssim, limits.max_diff)
    limits = Thresholds(*(g if g is not None else d for g, d in zip(given, defaults, strict=True)))
    settings = RoundtripSettings(output, golden, update_golden, limits, force)
    spec = model_spec(config, checkpoint, model, family, ema, device, dtype, attention, random_weights, subfolder)
    run_options(tile, tile_size, max_memory, batch_size)  # check the compute options before any work
    shards = tar_shards(inputs or [])
    if shards and files_from is not None:
        raise UsageError("give tar shards or --files-from, not both")
    files = [] if shards else collect_inputs(inputs or [], recursive=recursive, files_from=files_from)
    if not shards and not files:
        raise InputError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) found", " ".join(inputs or [files_from or ""]))
    for folder in (output, *(p.parent for p in (report_path, junit, html) if p is not None)):
        check_writable(folder)  # a folder that cannot be written fails before the model loads
    vae = load(spec)
    with Reporter(None if shards else len(files), quiet=quiet, verbose=verbose, label="round trip") as reporter:
        run = run_options(tile, tile_size, max_memory, batch_size, fail_fast=fail_fast, reporter=reporter)
        with attention_scope(spec.attention):
            if shards:
                results, summary = roundtrip_jobs(vae, shard_jobs(shards, output), settings, run)
            else:
                results, summary = roundtrip_files(vae, files, settings, run)
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
        console.print(report.roundtrip_table(doc))
    for r in results:
        if r.status in ("failed", "missing"):
            where = f" (heatmap: {r.heatmap})" if r.heatmap is not None else ""
            say(f"regression: {r.key}: {'; '.join(r.reasons)}{where}")
    if not doc["passed"]:
        raise typer.Exit(1)
