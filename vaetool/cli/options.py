"""Options shared by every command: Typer `Annotated` types, and the model they select.

A command declares the options it needs with the types below, packs them into `ModelOptions`
(and `ComputeOptions` for tiling and batching) and calls `load_model(opts)`, so every command
spells, documents and interprets `--config/--checkpoint/--model/--device/--dtype/...` the same way.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.text import Text

from vaetool.cli.app_state import Debug

if TYPE_CHECKING:
    import torch

    from vaetool.api import Vae
    from vaetool.pipeline import Event

__all__ = [
    "AttentionOpt",
    "BatchSizeOpt",
    "CheckpointOpt",
    "ComputeOptions",
    "ConfigOpt",
    "Debug",
    "Device",
    "DeviceOpt",
    "Dtype",
    "DtypeOpt",
    "EmaOpt",
    "FamilyOpt",
    "JsonOpt",
    "MaxMemoryOpt",
    "ModelOpt",
    "ModelOptions",
    "QuietOpt",
    "Reporter",
    "Tile",
    "TileOpt",
    "TileSizeOpt",
    "VerboseOpt",
    "attention_scope",
    "load_model",
    "resolve_device",
    "resolve_dtype",
]

_MODEL = "Model"
_COMPUTE = "Compute"
_OUTPUT = "Output"


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


class Tile(str, enum.Enum):
    """Tiling mode: auto (only when the memory planner says it does not fit), off, exact or fast."""

    auto = "auto"
    off = "off"
    exact = "exact"
    fast = "fast"


def _check_attention(name: str | None) -> str | None:
    """Typer callback: an attention backend must be one of vaetool.nn.attention.BACKENDS."""
    from vaetool.nn.attention import BACKENDS

    if name is not None and name != "auto" and name not in BACKENDS:
        raise typer.BadParameter(f"unknown backend {name!r}; choose one of auto, {', '.join(sorted(BACKENDS))}")
    return name


ConfigOpt = Annotated[
    str | None,
    typer.Option("--config", "-c", help="YAML config (or shipped config name) of the VAE.", rich_help_panel=_MODEL),
]
CheckpointOpt = Annotated[
    Path | None,
    typer.Option("--checkpoint", help="Weights: .safetensors, or .ckpt/.pt/.pth/.bin (weights_only).", rich_help_panel=_MODEL),
]
ModelOpt = Annotated[
    str | None,
    typer.Option("--model", "-m", help="Shipped config name (sd1, sdxl, sd3, flux, tiny-f8, ...); the default model when no --config/--checkpoint.", rich_help_panel=_MODEL),
]
FamilyOpt = Annotated[
    str | None,
    typer.Option("--family", help="Latent family (sd1, sd2, sdxl, sd3, flux, svd, ...) when the config does not say.", rich_help_panel=_MODEL),
]
EmaOpt = Annotated[bool, typer.Option("--ema", help="Use the EMA weights of a training checkpoint.", rich_help_panel=_MODEL)]
DeviceOpt = Annotated[
    Device, typer.Option("--device", help="auto picks cuda, then mps, then cpu.", case_sensitive=False, rich_help_panel=_COMPUTE)
]
DtypeOpt = Annotated[
    Dtype,
    typer.Option("--dtype", help="auto: fp32 on CPU, fp16 on cuda/mps (a batch with NaN is redone in fp32).", case_sensitive=False, rich_help_panel=_COMPUTE),
]
AttentionOpt = Annotated[
    str | None,
    typer.Option("--attention", help="Attention backend (auto, sdpa, basic, ...).", callback=_check_attention, rich_help_panel=_COMPUTE),
]
TileOpt = Annotated[
    Tile, typer.Option("--tile", help="Tiling: auto (only when needed), off, exact or fast.", case_sensitive=False, rich_help_panel=_COMPUTE)
]
TileSizeOpt = Annotated[
    int | None, typer.Option("--tile-size", min=16, help="Tile edge in image pixels (default: from the memory planner).", rich_help_panel=_COMPUTE)
]
MaxMemoryOpt = Annotated[
    str | None, typer.Option("--max-memory", help="Memory budget, e.g. 2GiB or 800MB (default: what the device has free).", rich_help_panel=_COMPUTE)
]
BatchSizeOpt = Annotated[
    int | None, typer.Option("--batch-size", "-b", min=1, help="Images per batch (default: from the memory planner).", rich_help_panel=_COMPUTE)
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no summary table.", rich_help_panel=_OUTPUT)]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Also report every file as it is done.", rich_help_panel=_OUTPUT)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object on stdout.", rich_help_panel=_OUTPUT)]


@dataclass(frozen=True)
class ModelOptions:
    """Which VAE to load and where to run it (the model options of every command)."""

    config: str | None = None
    checkpoint: Path | None = None
    model: str | None = None
    family: str | None = None
    ema: bool = False
    device: Device = Device.auto
    dtype: Dtype = Dtype.auto
    attention: str | None = None


@dataclass(frozen=True)
class ComputeOptions:
    """How to fit the work in memory: tiling mode and size, memory budget, batch size."""

    tile: Tile = Tile.auto
    tile_size: int | None = None
    max_memory: str | None = None
    batch_size: int | None = None


def resolve_device(device: Device | str) -> torch.device:
    """The torch device for --device (see vaetool.devices.resolve_device)."""
    from vaetool.devices import resolve_device as resolve

    return resolve(Device(device).value)


def resolve_dtype(dtype: Dtype | str, device: torch.device) -> torch.dtype:
    """The torch dtype for --dtype on `device` (see vaetool.devices.resolve_dtype)."""
    from vaetool.devices import resolve_dtype as resolve

    return resolve(Dtype(dtype).value, device)


@contextlib.contextmanager
def attention_scope(opts: ModelOptions) -> Iterator[None]:
    """Run the enclosed block with the attention backend chosen by --attention (no-op for auto/None)."""
    from vaetool.nn.attention import use_attention

    if opts.attention in (None, "auto"):
        yield
        return
    with use_attention(opts.attention):
        yield


def load_model(opts: ModelOptions) -> Vae:
    """Load the VAE that --config/--checkpoint/--model/--family/--ema name, on --device in --dtype."""
    from vaetool.api import DEFAULT_MODEL, load_vae
    from vaetool.errors import ConfigError

    if opts.model is not None and opts.config is not None:
        raise ConfigError("give --model or --config, not both")
    config = opts.config or opts.model
    if config is None and opts.checkpoint is None:
        config = DEFAULT_MODEL
    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device)
    vae = load_vae(config, opts.checkpoint, family=opts.family, ema=opts.ema, device=device, dtype=dtype)
    vae.source.setdefault("config_name", config)
    return vae


class Reporter:
    """What a long command tells the user on stderr: a Rich progress bar (images/s, ETA) when stderr is a
    terminal and not --quiet, one line per failed file (always), one per file with --verbose, and notices."""

    def __init__(self, total: int | None, *, quiet: bool = False, verbose: bool = False, label: str = "working") -> None:
        from vaetool.cli import app_state

        self.console, self.verbose = app_state.err_console, verbose
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
            self.print(f"failed: {event.job.source}: {event.reason}")
        elif self.verbose:
            self.print(f"{event.kind}: {event.job.source}" + (f" -> {event.result}" if event.result is not None else ""))
        if not event.retracted:  # a retracted job was counted when it was reported done
            self.progress.advance(self.task)


class _RateColumn(ProgressColumn):
    """Images per second of a task, for the progress bar."""

    def render(self, task: Task) -> Text:
        """The task's current speed."""
        return Text(f"{task.speed or 0:.1f} img/s")
