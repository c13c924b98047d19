"""What every command shares: the consoles (data on stdout, messages on stderr), the options as Typer
`Annotated` types, the progress reporter and the end-of-run summary.

Nothing here imports torch: `vaetool --help` and option parsing stay fast. A command builds its
ModelSpec/RunOptions from these options inside its function and calls a job in vaetool.jobs.
"""

from __future__ import annotations

import enum
import json
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.text import Text

from vaetool.errors import printable

if TYPE_CHECKING:
    from vaetool.api import Vae
    from vaetool.jobs.common import ModelSpec, RunOptions
    from vaetool.pipeline import Event, Summary

console = Console()  # data: tables, JSON
err_console = Console(stderr=True)  # progress, notes, warnings, errors
state = {"debug": False}

MODEL_PANEL, COMPUTE_PANEL, OUTPUT_PANEL = "Model", "Compute", "Output"


class Device(str, enum.Enum):
    """Where the model runs."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


class Dtype(str, enum.Enum):
    """Floating dtype of the weights and activations."""

    auto = "auto"
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


class TileMode(str, enum.Enum):
    """Tiling mode: auto (only when the memory planner says it does not fit), off, exact or fast."""

    auto = "auto"
    off = "off"
    exact = "exact"
    fast = "fast"


def _check_attention(name: str | None) -> str | None:
    """Typer callback: an attention backend must be one vaetool.nn.attention knows."""
    if name is None or name == "auto":
        return name
    from vaetool.nn.attention import resolve_backend

    try:
        resolve_backend(name)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    return name


def _check_memory(text: str | None) -> str | None:
    """Typer callback: --max-memory must be a memory size."""
    if text is None:
        return None
    from vaetool.memory import parse_memory

    try:
        parse_memory(text)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    return text


Debug = Annotated[bool, typer.Option("--debug", help="Show the full traceback of an error.")]
ConfigOpt = Annotated[
    str | None, typer.Option("--config", "-c", help="YAML config (or shipped config name) of the VAE.", rich_help_panel=MODEL_PANEL)
]
CheckpointOpt = Annotated[
    str | None,
    typer.Option("--checkpoint", help="Weights: .safetensors, or .ckpt/.pt/.pth/.bin (weights_only); a diffusers folder "
                 "(its config.json is honoured); or a Hugging Face repo id ORG/NAME[@REV] (from the local cache; needs "
                 "vaetool[hub]).", rich_help_panel=MODEL_PANEL),
]
SubfolderOpt = Annotated[
    str | None,
    typer.Option("--subfolder", help="The VAE's folder inside a diffusers pipeline folder or repo (default: vae).",
                 rich_help_panel=MODEL_PANEL),
]
ModelOpt = Annotated[
    str | None,
    typer.Option("--model", "-m", help="Shipped config name (sd1, sdxl, sd3, flux, tiny-f8, ...) or a Hugging Face repo id "
                 "ORG/NAME[@REV]; the default model when no --config/--checkpoint.", rich_help_panel=MODEL_PANEL),
]
FamilyOpt = Annotated[
    str | None,
    typer.Option("--family", help="Latent family (sd1, sd2, sdxl, sd3, flux, svd, ...) when the config does not say.",
                 rich_help_panel=MODEL_PANEL),
]
EmaOpt = Annotated[bool, typer.Option("--ema", help="Use the EMA weights of a training checkpoint.", rich_help_panel=MODEL_PANEL)]
RandomWeightsOpt = Annotated[
    bool, typer.Option("--random-weights", help="Build random weights for a config that names none (test runs only: the outputs "
                       "mean nothing and are marked so).", rich_help_panel=MODEL_PANEL)
]
DeviceOpt = Annotated[
    Device, typer.Option("--device", help="auto picks cuda, then mps, then cpu.", case_sensitive=False, rich_help_panel=COMPUTE_PANEL)
]
DtypeOpt = Annotated[
    Dtype,
    typer.Option("--dtype", help="auto: fp16 on cuda/mps; on the CPU fp32, or bf16 for encode/decode where the CPU has native bf16 "
                 "(VAETOOL_CPU_BF16=0: fp32). A batch with NaN is redone in fp32.", case_sensitive=False,
                 rich_help_panel=COMPUTE_PANEL),
]
AttentionOpt = Annotated[
    str | None,
    typer.Option("--attention", help="Attention backend (auto, sdpa, basic, ...).", callback=_check_attention,
                 rich_help_panel=COMPUTE_PANEL),
]
TileOpt = Annotated[
    TileMode,
    typer.Option("--tile", help="Tiling: auto (only when needed: exact, else fast), off, exact or fast.", case_sensitive=False,
                 rich_help_panel=COMPUTE_PANEL),
]
TileSizeOpt = Annotated[
    int | None, typer.Option("--tile-size", min=16, help="Tile edge in image pixels (default: from the memory planner).",
                             rich_help_panel=COMPUTE_PANEL)
]
MaxMemoryOpt = Annotated[
    str | None, typer.Option("--max-memory", help="Memory budget, e.g. 2GiB or 800MB (default: what the device has free).",
                             callback=_check_memory, rich_help_panel=COMPUTE_PANEL)
]
BatchSizeOpt = Annotated[
    int | None, typer.Option("--batch-size", "-b", min=1, help="Images per batch (default: from the memory planner).",
                             rich_help_panel=COMPUTE_PANEL)
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no summary.", rich_help_panel=OUTPUT_PANEL)]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Also report every file as it is done.", rich_help_panel=OUTPUT_PANEL)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object on stdout.", rich_help_panel=OUTPUT_PANEL)]
RecursiveOpt = Annotated[bool, typer.Option("--recursive", "-r", help="Also take the files in subfolders of folder inputs.")]
FilesFromOpt = Annotated[
    str | None, typer.Option("--files-from", help="Also take the files listed in this file (one per line; - for stdin).")
]
FailFastOpt = Annotated[bool, typer.Option("--fail-fast", help="Stop at the first bad input (default: report it and go on).")]


def model_spec(
    config: str | None, checkpoint: str | None, model: str | None, family: str | None, ema: bool, device: Device, dtype: Dtype,
    attention: str | None, random_weights: bool = False, subfolder: str | None = None, parts: str = "all",
) -> ModelSpec:
    """The ModelSpec of the model options every command takes (`parts`: the coder the command runs, or all)."""
    from vaetool.jobs.common import ModelSpec

    return ModelSpec(config, checkpoint, model, family, ema, device.value, dtype.value, attention, random_weights, subfolder, parts)


def load(spec: ModelSpec) -> Vae:
    """Load the model a command names; random weights are said on stderr, once, in one line."""
    import warnings

    from vaetool.api import RandomWeightsWarning
    from vaetool.jobs.common import load_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)  # said below, in the command's words
        vae = load_model(spec, on_notice=note)
    if vae.source.get("random_weights"):
        name = vae.source.get("config_name") or vae.source.get("config")
        say(f"warning: {name}: random weights (a test model or --random-weights): the outputs mean nothing and are "
            "marked random_weights: true")
    return vae


def run_options(
    tile: TileMode, tile_size: int | None, max_memory: str | None, batch_size: int | None, *, workers: int = 2, fail_fast: bool = False,
    reporter: Reporter | None = None,
) -> RunOptions:
    """The RunOptions of the compute options every command takes (progress to `reporter`)."""
    from vaetool.jobs.common import RunOptions
    from vaetool.tiling import Tiling

    tiling = Tiling(tile.value, tile_size, max_memory)
    hooks = {} if reporter is None else {"on_event": reporter.event, "on_notice": reporter.notice}
    return RunOptions(tiling, batch_size, workers, fail_fast, **hooks)


def say(text: str) -> None:
    """One line on stderr, as it is (no markup)."""
    err_console.print(text, markup=False, highlight=False, soft_wrap=True)


def note(text: str) -> None:
    """A one-off note on stderr (e.g. how the model was loaded)."""
    say(f"note: {text}")


class Reporter:
    """What a long command tells the user on stderr: a Rich progress bar (images/s, ETA) when stderr is a
    terminal and not --quiet, one line per failed file (always), one per file with --verbose, and notices."""

    def __init__(self, total: int | None, *, quiet: bool = False, verbose: bool = False, label: str = "working") -> None:
        self.console, self.verbose, self.quiet = err_console, verbose, quiet
        show = not quiet and self.console.is_terminal
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _RateColumn(), TimeRemainingColumn(),
            console=self.console, disable=not show, transient=False,
        )
        self.task = self.progress.add_task(label, total=total)

    def __enter__(self) -> Reporter:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def print(self, text: str) -> None:
        """One line on stderr (above the progress bar when there is one)."""
        self.progress.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def notice(self, text: str) -> None:
        """A one-off note, e.g. that a batch was redone in fp32."""
        self.print(f"note: {text}")

    def event(self, event: Event) -> None:
        """Advance the bar and report a failure (or, with --verbose, every file)."""
        if event.kind == "failed":
            self.print(f"failed: {printable(event.job.source)}: {event.reason}")
        elif self.verbose:
            output = getattr(event.result, "output", event.result)  # a written path, or a result that names its output
            result = f" -> {printable(str(output))}" if output is not None else ""
            self.print(f"{event.kind}: {printable(event.job.source)}{result}")
        if not event.retracted:  # a retracted job was counted when it was reported done
            self.progress.advance(self.task)


class _RateColumn(ProgressColumn):
    """Images per second of a task, for the progress bar."""

    def render(self, task: Task) -> Text:
        """The task's current speed."""
        return Text(f"{task.speed or 0:.1f} img/s")


def print_summary(headline: str, noun: str, summary: Summary, extra: dict[str, Any], *, as_json: bool, quiet: bool) -> None:
    """The end of a run: JSON on stdout with --json, `headline` on stderr unless --quiet, and every failure listed."""
    if as_json:
        typer.echo(json.dumps(summary.as_dict() | extra, indent=2))
    if not quiet:
        redone = f", {summary.fp32_retries} batches redone in fp32" if summary.fp32_retries else ""
        say(f"{headline} in {summary.seconds:.1f} s ({summary.images_per_s:.1f}/s){redone} -> {extra['output']}")
    if summary.stopped:
        say("stopped at the first failure (--fail-fast)")
    if summary.failed:
        say(f"{len(summary.failed)} {noun}(s) failed:")
        for failure in summary.failed:
            say(f"  {printable(failure.source)}: {failure.reason}")
