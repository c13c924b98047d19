"""`vaetool train CONFIG`: train or fine-tune an autoencoder; resumes from OUT/state.pt after a kill."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from vaetool.cli.common import Debug, err_console

NAME = "train"
HELP = "Train or fine-tune an autoencoder from a YAML config (checkpoints, EMA, validation PSNR, resume)."


def command(
    config: Annotated[Path, typer.Argument(help="Training YAML: model, data, optimizer, loss, schedule.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run folder (default runs/CONFIG_NAME).")] = None,
    steps: Annotated[int | None, typer.Option(help="Override the config's total steps.")] = None,
    init: Annotated[Path | None, typer.Option("--init", "--checkpoint", help="Start from these weights.")] = None,
    decoder_only: Annotated[bool, typer.Option("--decoder-only", help="Freeze the encoder; train the decoder only.")] = False,
    device: Annotated[str, typer.Option(help="cpu, cuda, mps or auto.")] = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    debug: Debug = False,
) -> None:
    """Train; the EMA weights are written to OUT/model.safetensors at every checkpoint."""
    import torch

    from vaetool.errors import InputError
    from vaetool.train import load_train_settings, train

    if decoder_only and init is None:
        raise InputError("--decoder-only fine-tunes existing weights: give them with --init CHECKPOINT")
    settings = load_train_settings(config, {"steps": steps} if steps else None)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
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
        result = train(settings, out, init=init, decoder_only=decoder_only, device=device, warn=warn, progress=report)
    finally:
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
