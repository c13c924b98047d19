"""`vaetool info PATH`: what a checkpoint or config is (layout, family, architecture, parameters, dtype)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from vaetool.cli.common import Debug, SubfolderOpt, console

NAME = "info"
HELP = "Describe a VAE checkpoint or config: layout, family, architecture, parameters, dtype."

CONFIG_SUFFIXES = (".yaml", ".yml")


def describe_config(name_or_path: str) -> dict[str, Any]:
    """Summary of a shipped or user config (the model is built with random weights to check it)."""
    from vaetool.checkpoints import describe
    from vaetool.config import instantiate_from_config, load_vae_config

    cfg = load_vae_config(name_or_path)
    model = instantiate_from_config(cfg.model)
    summary = {"kind": "config", "path": cfg.source, "target": cfg.model["target"]}
    summary |= describe(model.state_dict())
    summary.pop("layout", None)
    summary["latent_format"] = None if cfg.latent_format is None else cfg.latent_format.as_dict()
    summary["checkpoint"] = None if cfg.checkpoint is None else str(cfg.checkpoint)
    return summary


def describe_checkpoint(path: str | Path, *, ema: bool, family: str | None, subfolder: str | None = None) -> dict[str, Any]:
    """Summary of a checkpoint file, diffusers folder or repo id; the model is built and loaded strictly to verify it."""
    from vaetool.checkpoints import describe, load_into
    from vaetool.config import instantiate_from_config
    from vaetool.families import get_family
    from vaetool.sources import check_family, open_checkpoint

    loaded = open_checkpoint(path, ema=ema, subfolder=subfolder)
    load_into(instantiate_from_config(loaded.config), loaded.state_dict, loaded.path)
    summary: dict[str, Any] = {"kind": "checkpoint", "path": str(path), "size_bytes": loaded.path.stat().st_size}
    summary |= describe(loaded.state_dict)
    summary["layout"] = loaded.layout
    summary["norm_groups"] = loaded.config["params"]["encoder_config"]["params"].get("norm_groups", 32)
    summary |= {"prefix": loaded.prefix, "has_ema": loaded.has_ema, "used_ema": loaded.used_ema}
    recorded = family or loaded.metadata.get("family")
    summary["family"] = recorded
    summary["latent_format"] = get_family(recorded).as_dict() if recorded and family else None
    if loaded.latent_format is not None:  # a diffusers config.json declares it
        chosen = get_family(family) if family else loaded.latent_format
        check_family(loaded.latent_format, chosen, str(path))
        summary |= {"family": chosen.family, "latent_format": {**chosen.as_dict(), "family": chosen.family}}
        summary |= {"force_upcast": loaded.force_upcast, **loaded.origin, "weights": str(loaded.path)}
    summary["metadata"] = loaded.metadata
    summary["sha256"] = loaded.sha256
    return summary


def _table(summary: dict[str, Any]) -> Table:
    table = Table(title=f"{summary['kind']}: {summary['path']}", show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in summary.items():
        if key in ("kind", "path") or value in (None, {}, []):
            continue
        if isinstance(value, int) and not isinstance(value, bool) and value >= 10_000:
            value = f"{value:,}"
        elif isinstance(value, (dict, list)):
            value = json.dumps(value)
        table.add_row(key.replace("_", " "), escape(str(value)))  # "[false, true]" is not Rich markup
    return table


def command(
    path: Annotated[str, typer.Argument(help="A checkpoint (.safetensors/.ckpt/.pt/.pth/.bin), a diffusers folder, a Hugging Face "
                                        "repo id ORG/NAME[@REV], a YAML config, or a shipped config name.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (for scripts).")] = False,
    ema: Annotated[bool, typer.Option("--ema", help="Describe the EMA weights of a training checkpoint.")] = False,
    family: Annotated[str | None, typer.Option("--family", help="Family of the checkpoint (sd1, sdxl, sd3, flux, ...).")] = None,
    subfolder: SubfolderOpt = None,
    debug: Debug = False,
) -> None:
    """Describe a VAE checkpoint or config."""
    from vaetool.config import find_config_file
    from vaetool.errors import CheckpointError, InputError
    from vaetool.hub import looks_like_repo_id

    candidate = Path(path)
    repo = looks_like_repo_id(path)
    is_config = not repo and (candidate.suffix.lower() in CONFIG_SUFFIXES or (not candidate.exists() and not candidate.suffix))
    if is_config:
        summary = describe_config(str(find_config_file(path)))
    elif candidate.exists() or repo:
        try:
            summary = describe_checkpoint(path if repo else candidate, ema=ema, family=family, subfolder=subfolder)
        except CheckpointError as err:  # the file described is this command's input: a failed input, not a usage error
            raise InputError(err.problem, err.path) from None
    else:
        raise InputError("no such file", candidate)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        console.print(_table(summary))
