"""`vaetool train CONFIG`: train or fine-tune an autoencoder; resumes from OUT/state.pt after a kill."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from vaetool.cli.common import Debug, Device, err_console
from vaetool.errors import CheckpointError, UsageError

NAME = "train"
HELP = "Train or fine-tune an autoencoder from a YAML config (checkpoints, EMA, validation PSNR, resume)."


def command(
    config: Annotated[Path, typer.Argument(help="Training YAML: model, data, optimizer, loss, schedule.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run folder (default runs/CONFIG_NAME).")] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="Override the config's total steps.")] = None,
    init: Annotated[Path | None, typer.Option("--init", "--checkpoint", help="Start from these weights.")] = None,
    decoder_only: Annotated[bool, typer.Option("--decoder-only", help="Freeze the encoder; train the decoder only.")] = False,
    device: Annotated[Device, typer.Option(help="auto picks cuda, then mps, then cpu.", case_sensitive=False)] = Device.auto,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    debug: Debug = False,
) -> None:
    """Train; the EMA weights are written to OUT/model.safetensors at every checkpoint."""
    from vaetool.devices import resolve_device
    from vaetool.train import load_train_settings, train

    if decoder_only and init is None:
        raise UsageError("--decoder-only fine-tunes existing weights: give them with --init CHECKPOINT")
    config = _recipe(config)
    if init is not None:
        _check_init(init)
    where = resolve_device(device.value)  # an unusable --device is said before the data is read
    device_name = where.type
    settings = load_train_settings(config, {"steps": steps} if steps else None)
    out = out or Path("runs") / config.stem
    warn = lambda msg: err_console.print(f"[yellow]warning:[/yellow] {msg}", highlight=False, soft_wrap=True)  # noqa: E731
    columns = (TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    bar = Progress(*columns, console=err_console, disable=quiet)
    task = bar.add_task("train", total=settings.steps, info="")

    def report(step: int, total: int, metrics: dict[str, float]) -> None:
        if not bar.live.is_started:  # only once the data is read and the model built
            bar.start()
        bar.update(task, completed=step, info=" ".join(f"{k} {v:.4g}" for k, v in metrics.items()))

    try:
        result = train(settings, out, init=init, decoder_only=decoder_only, device=device_name, warn=warn, progress=report)
    finally:
        if bar.live.is_started:  # stopping a bar never started prints an empty line before the error
            bar.stop()
    summary = {"out": str(result.out_dir), "weights": str(result.weights), "step": result.step,
               "resumed_from": result.resumed_from, "val_psnr": result.val_psnr, "latent_std": result.latent_std,
               "seconds": round(result.seconds, 1)}
    if json_out:
        typer.echo(json.dumps(summary))
    else:
        psnr = "n/a" if result.val_psnr is None else f"{result.val_psnr:.2f} dB"
        err_console.print(f"step {result.step} (resumed from {result.resumed_from}); val PSNR {psnr}; "
                                    f"weights {result.weights}", highlight=False)


def _recipe(config: Path) -> Path:
    """The training recipe a CONFIG argument names (a path, or a shipped recipe's name such as train-mini);
    UsageError for a file that is no recipe (an image, a model config)."""
    from vaetool.config import find_config_file, is_recipe, load_yaml
    from vaetool.io.sniff import sniff

    if not config.exists() and not config.suffix:
        config = find_config_file(str(config))  # a shipped recipe by name; ConfigError (exit 2) naming them otherwise
    if config.is_file():
        kind = sniff(config)
        if kind is not None and kind != "a text file":
            raise UsageError(f"not a YAML training recipe ({kind})", config)
        if not is_recipe(load_yaml(config)):
            raise UsageError("a model config (use it with -m/--config), not a training recipe (model:, data:, optimizer:, "
                             "steps: ...; see configs/train-mini.yaml)", config)
    return config


def _check_init(init: Path) -> None:
    """--init must be a checkpoint file (or folder) that exists; an image or text file is named as such."""
    from vaetool.io.sniff import sniff

    if not init.exists():
        raise CheckpointError("no such file (--init)", init)
    if init.is_file() and (kind := sniff(init)) is not None:
        raise CheckpointError(f"not a checkpoint file ({kind})", init)
