"""Where a checkpoint comes from: a weights file, a diffusers model folder, or a Hugging Face repo id.

`open_checkpoint` is the one entry point (api.load_vae and `info` use it). A folder (or a repo's
cached snapshot) goes through vaetool.diffusers_config: its config.json is read, the weights file
beside it goes through checkpoints.load_checkpoint like any other, and the two are checked against
each other. The result is a LoadedCheckpoint that also carries the declared latent format, the
upcast advice and where it came from.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from vaetool.checkpoints import LoadedCheckpoint, load_checkpoint
from vaetool.diffusers_config import check_weights, find_config, find_weights, folder_files, folder_of, latent_format, read_config
from vaetool.errors import ConfigError, UsageError
from vaetool.families import LatentFormat
from vaetool.hub import looks_like_repo_id, resolve_repo

__all__ = ["advised_dtype", "check_family", "load_folder", "open_checkpoint"]


def load_folder(
    folder: Path, *, subfolder: str | None = None, ema: bool = False, origin: dict[str, str] | None = None, without: str | None = None
) -> LoadedCheckpoint:
    """A diffusers VAE folder (or a pipeline folder's vae/, or `subfolder`): its weights, checked against its config.json."""
    names, where = folder_files(folder, subfolder), (origin or {}).get("repo", folder)
    config_name = find_config(names, subfolder, where)
    cfg = read_config(folder / config_name)  # an unsupported class is named before missing weights
    loaded = load_checkpoint(folder / find_weights(names, config_name, where), ema=ema, without=without)
    check_weights(cfg, loaded.config, loaded.path)
    for coder in ("encoder_config", "decoder_config"):
        loaded.config["params"][coder]["params"]["norm_groups"] = cfg.norm_num_groups
    sub = folder_of(config_name)
    found = {"diffusers_config": str(cfg.path), "class": cfg.class_name} | ({"subfolder": sub} if sub else {})
    return dataclasses.replace(
        loaded, latent_format=latent_format(cfg), force_upcast=cfg.force_upcast, origin=(origin or {}) | found
    )


def open_checkpoint(
    checkpoint: str | Path, *, ema: bool = False, subfolder: str | None = None, without: str | None = None
) -> LoadedCheckpoint:
    """A weights file, a diffusers folder, or (a str) a Hugging Face repo id ORG/NAME[@REV], loaded (no model built).

    `without="encoder"` (or "decoder") leaves that coder's tensors unread (meta tensors, for the key check).
    """
    path = Path(checkpoint)
    if path.is_dir():
        return load_folder(path, subfolder=subfolder, ema=ema, without=without)
    if looks_like_repo_id(checkpoint):
        snapshot, origin = resolve_repo(str(checkpoint), subfolder)
        return load_folder(snapshot, subfolder=subfolder, ema=ema, origin=origin, without=without)
    if subfolder is not None:
        raise UsageError(f"--subfolder {subfolder} applies to a diffusers folder or a repo id, not a file", path)
    return load_checkpoint(path, ema=ema, without=without)


def check_family(declared: LatentFormat | None, chosen: LatentFormat, where: str) -> None:
    """ConfigError when a family the user named scales or shifts otherwise than the checkpoint's config declares."""
    if declared is None or (declared.scale, declared.shift) == (chosen.scale, chosen.shift):
        return
    raise ConfigError(
        f"--family {chosen.family} scales by {chosen.scale} and shifts by {chosen.shift}, but its config declares "
        f"{declared.scale} and {declared.shift} ({declared.family}); leave out --family to use the config's", where
    )


def advised_dtype(loaded: LoadedCheckpoint | None, dtype: torch.dtype) -> tuple[torch.dtype, str | None]:
    """fp32 instead of fp16 when the checkpoint's config sets force_upcast (with the note that says so); else `dtype`."""
    if loaded is None or not loaded.force_upcast or dtype != torch.float16:
        return dtype, None
    where = loaded.origin.get("repo") or loaded.origin.get("diffusers_config") or str(loaded.path)
    return torch.float32, f"{where}: config.json sets force_upcast (this VAE overflows in fp16), so it runs in fp32, not fp16"
