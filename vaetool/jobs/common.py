"""What every job shares: which model to load (ModelSpec), how to run (RunOptions), the engine's batch
size from the memory planner, output folders, and the provenance written into outputs."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from vaetool.api import DEFAULT_MODEL
from vaetool.errors import ConfigError, OutputError, UsageError, VaeToolError
from vaetool.pipeline import EngineOptions, Event
from vaetool.tiling import Tiling, choose

if TYPE_CHECKING:
    from vaetool.api import Vae

__all__ = [
    "DEFAULT_MODEL",
    "MAX_AUTO_BATCH",
    "ModelSpec",
    "RunOptions",
    "attention_scope",
    "check_writable",
    "engine_options",
    "load_model",
    "model_text",
    "png_text",
    "prepare_output",
]  # fmt: skip

MAX_AUTO_BATCH = 16  # the most items per batch the planner is asked for


@dataclass(frozen=True)
class ModelSpec:
    """Which VAE to load and where to run it: a config (shipped name or YAML) and/or a checkpoint, device, dtype."""

    config: str | None = None
    checkpoint: str | Path | None = None  # a weights file, a diffusers folder, or a Hugging Face repo id ORG/NAME[@REV]
    model: str | None = None  # a shipped config name or a repo id (the CLI's -m); another spelling of `config`/`checkpoint`
    family: str | None = None
    ema: bool = False
    device: str = "auto"
    dtype: str = "auto"
    attention: str | None = None  # backend name; None or "auto": the default
    random_weights: bool = False  # a config without weights builds random ones (only for test runs)
    subfolder: str | None = None  # the VAE's folder inside a diffusers pipeline folder or repo (default vae/)
    parts: str = "all"  # "decoder" or "encoder": load only the coder the job runs (the other is never read)


def load_model(spec: ModelSpec, on_notice: Callable[[str], None] | None = None) -> Vae:
    """Load the VAE a ModelSpec names (the default model when it names none), on its device in its dtype.

    Notes about the loading (e.g. an fp16 request run in fp32 because the model's config says so) go to `on_notice`.
    """
    import torch

    from vaetool.api import load_vae
    from vaetool.devices import resolve_device, resolve_dtype
    from vaetool.hub import looks_like_repo_id

    if spec.model is not None and spec.config is not None:
        raise ConfigError("give --model or --config, not both")
    model, checkpoint = spec.model, spec.checkpoint
    if model is not None and looks_like_repo_id(model):  # -m ORG/NAME: a repo id is a checkpoint
        if checkpoint is not None:
            raise UsageError(f"--model {model} names a Hugging Face repo and --checkpoint another model; give one")
        model, checkpoint = None, model
    config = spec.config or model
    if config is None and checkpoint is None:
        config = DEFAULT_MODEL
    device = resolve_device(spec.device)
    one_way = spec.parts != "all"  # encode or decode alone; round trips compare with fp32 goldens, so they stay fp32
    dtype = resolve_dtype(spec.dtype, device, cpu_bf16=one_way)
    if on_notice is not None and spec.dtype == "auto" and device.type == "cpu" and dtype == torch.bfloat16:
        on_notice("--dtype auto: bf16, since this CPU computes in bf16 natively (about 2x fp32; --dtype fp32 for full precision)")
    vae = load_vae(config, checkpoint, subfolder=spec.subfolder, family=spec.family, ema=spec.ema, device=device, dtype=dtype,
                   random_weights=spec.random_weights, parts=spec.parts)
    vae.source.setdefault("config_name", config)
    if on_notice is not None:
        for note in vae.source.get("notes", []):
            on_notice(note)
    return vae


@contextlib.contextmanager
def attention_scope(name: str | None) -> Iterator[None]:
    """Run the enclosed block with the attention backend `name` (no-op for None and "auto")."""
    from vaetool.nn.attention import resolve_backend, use_attention

    if name in (None, "auto"):
        yield
        return
    try:
        resolve_backend(name)
    except ValueError as err:
        raise ConfigError(f"--attention: {err}") from None
    with use_attention(name):
        yield


@dataclass(frozen=True)
class RunOptions:
    """How a job runs: memory (tiling, batch size), loader threads, failure policy, and who hears of progress."""

    tiling: Tiling = field(default_factory=Tiling)
    batch_size: int | None = None  # items per batch (None: the memory planner's, at most MAX_AUTO_BATCH)
    workers: int = 2
    fail_fast: bool = False
    on_event: Callable[[Event], None] | None = None
    on_notice: Callable[[str], None] | None = None


def engine_options(vae: Vae, direction: str, run: RunOptions, *, latent_items: bool | None = None) -> EngineOptions:
    """The engine's options for a job: --batch-size, or per item shape the planner's batch for the `direction` call.

    Items are latents [C, h, w] for decode and images [3, H, W] for encode, unless `latent_items` says
    otherwise (a round trip plans its decoder call on image-sized items).
    """
    if run.batch_size is not None:
        batch: int | Callable[[tuple[int, ...]], int] = run.batch_size
    else:
        planned: dict[tuple[int, ...], int] = {}
        latents = direction == "decode" if latent_items is None else latent_items
        scale = vae.downscale if latents else 1

        def size(shape: tuple[int, ...]) -> int:
            if shape not in planned:
                try:
                    choice = choose(vae, direction, MAX_AUTO_BATCH, shape[-2] * scale, shape[-1] * scale, run.tiling)
                    planned[shape] = max(1, choice.batch_size)
                except VaeToolError:  # too big even tiled: batches of one, and the model call names the problem
                    planned[shape] = 1
            return planned[shape]

        batch = size
    return EngineOptions(batch_size=batch, workers=run.workers, fail_fast=run.fail_fast, on_event=run.on_event,
                         on_notice=run.on_notice)


def prepare_output(out_dir: Path) -> None:
    """Create the output folder; OutputError naming it when that fails or it is not writable."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create the output folder: {err.strerror or err}", out_dir) from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise OutputError("the output folder is not writable", out_dir)


def check_writable(out_dir: Path) -> None:
    """OutputError when the output folder could not be created or written; nothing is created (a usage error found
    later, e.g. while the model loads, leaves no empty folder behind)."""
    probe = out_dir
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if probe != out_dir and not probe.is_dir():
        raise OutputError(f"cannot create the output folder: {probe} is not a folder", out_dir)
    if probe.is_dir() and not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError("the output folder is not writable" if probe == out_dir
                          else f"cannot create the output folder: {probe} is not writable", out_dir)


def model_text(vae: Vae) -> str:
    """The model's provenance for PNG text chunks: config name, checkpoint and hash, family (JSON)."""
    src = vae.source
    fields = {
        "config": src.get("config_name") or src.get("config"),
        "checkpoint": src.get("checkpoint"),
        "repo": f"{src['repo']}@{src['revision']}" if src.get("repo") else None,
        "sha256": src.get("sha256") or ("random-weights" if src.get("random_weights") else None),
        "family": vae.latent_format.family,
        "random_weights": True if src.get("random_weights") else None,
    }
    return json.dumps({k: v for k, v in fields.items() if v is not None}, sort_keys=True)


def png_text(vae: Vae, source: str, **extra: str) -> dict[str, str]:
    """PNG text chunks: where the image came from, which model, which vaetool."""
    from vaetool import __version__

    return {"vaetool.source": source, "vaetool.model": model_text(vae), "vaetool.version": __version__, **extra}
