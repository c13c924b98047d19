"""`vaetool info [PATH]`: what a latent file, checkpoint or config is; with no PATH, the shipped configs (vaetool.describe reads them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from vaetool.cli.common import Debug, SubfolderOpt, console
from vaetool.errors import CheckpointError, InputError, VaeToolError

NAME = "info"
HELP = "Describe a latent file, VAE checkpoint or config (family, latent shape, dtype, provenance); no argument: list the shipped configs."

CONFIG_SUFFIXES = (".yaml", ".yml")


def built_config(name_or_path: str) -> dict[str, Any]:
    """--build: the config's model built with random weights (imports torch): its tensors, parameters, dtypes."""
    from vaetool.checkpoints import describe
    from vaetool.config import instantiate_from_config, load_vae_config

    model = instantiate_from_config(load_vae_config(name_or_path).model)
    built = describe(model.state_dict())
    return {"built_" + k: built[k] for k in ("tensors", "parameters", "dtypes")}


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


def _configs_table(rows: list[dict[str, Any]], recipes: list[str]) -> Table:
    title = "shipped configs (use with -m NAME; details: vaetool info NAME); ch: latent channels, down: downscale"
    table = Table(title=title, title_justify="left")
    for column, justify in (("name", "left"), ("family", "left"), ("ch", "right"), ("down", "right"), ("weights", "left")):
        table.add_column(column, justify=justify, no_wrap=column != "weights")  # type: ignore[arg-type]
    for row in rows:
        if "error" in row:
            table.add_row(escape(row["name"]), "", "", "", escape(row["error"]))
            continue
        weights = {"shipped": f"shipped ({', '.join(row.get('dtypes', {})) or '?'})",
                   "random (test model)": "random: test only"}.get(row["weights"], row["weights"])
        table.add_row(escape(row["name"]), escape(str(row["family"])), str(row["latent_channels"] or "?"),
                      str(row["downscale"] or "?"), escape(weights))
    if recipes:
        table.caption = f"training recipes (vaetool train configs/NAME.yaml), not models: {', '.join(recipes)}"
        table.caption_justify = "left"
    return table


def command(
    path: Annotated[str | None, typer.Argument(help="A latent file, a checkpoint (.safetensors/.ckpt/.pt/.pth/.bin), a diffusers "
                                               "folder, a Hugging Face repo id ORG/NAME[@REV], a YAML config, or a shipped config "
                                               "name; none: list the shipped configs.", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (for scripts).")] = False,
    ema: Annotated[bool, typer.Option("--ema", help="Describe the EMA weights of a training checkpoint.")] = False,
    family: Annotated[str | None, typer.Option("--family", help="Family of the checkpoint (sd1, sdxl, sd3, flux, ...).")] = None,
    build: Annotated[bool, typer.Option("--build", help="Config: also build the model with random weights (slow: imports "
                                        "torch) to check it and count its parameters.")] = False,
    subfolder: SubfolderOpt = None,
    debug: Debug = False,
) -> None:
    """Describe a latent file, VAE checkpoint or config; list the shipped configs."""
    from vaetool.config import find_config_file
    from vaetool.describe import config_rows, describe_config, describe_latent, is_latent_file
    from vaetool.hub import looks_like_repo_id

    if path is None:
        rows, recipes = config_rows()
        if as_json:
            typer.echo(json.dumps({"configs": rows, "training_recipes": recipes}, indent=2))
        else:
            console.print(_configs_table(rows, recipes))
        return
    candidate = Path(path)
    repo = looks_like_repo_id(path)
    is_config = not repo and (candidate.suffix.lower() in CONFIG_SUFFIXES or (not candidate.exists() and not candidate.suffix))
    if is_config:
        summary = describe_config(str(find_config_file(path)))
        if build:
            summary |= built_config(str(find_config_file(path)))
    elif candidate.is_file() and is_latent_file(candidate):
        summary = describe_latent(candidate)
    elif candidate.exists() or repo:
        try:
            summary = describe_checkpoint(path if repo else candidate, ema=ema, family=family, subfolder=subfolder)
        except CheckpointError as err:  # the file described is this command's input: a failed input, not a usage error
            if candidate.suffix.lower() in (".pt", ".pth") and candidate.is_file():
                summary = _latent_or(candidate, err)
            else:
                raise InputError(err.problem, err.path) from None
    else:
        raise InputError("no such file", candidate)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        console.print(_table(summary))


def _latent_or(path: Path, err: CheckpointError) -> dict[str, Any]:
    """A .pt that is no checkpoint may be a latent file; else the checkpoint error, as a failed input."""
    from vaetool.describe import describe_latent

    try:
        return describe_latent(path)
    except VaeToolError:
        raise InputError(err.problem, err.path) from None
