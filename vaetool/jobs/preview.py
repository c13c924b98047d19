"""`vaetool decode --preview TAESD`: a TAESD checkpoint decodes the latents instead of the full VAE.

The TAESD's architecture comes from its keys (the published taesd, taesdxl, taesd3 and taef1, or a
smaller one); its family, which keys cannot tell (taesd vs taesdxl), is the full model's: --family,
else the family the -m/--config config declares. The full VAE is never loaded, so the options that
only say where its weights are (--checkpoint, --subfolder, --ema, --random-weights) are refused.
The latents are read as for the full model (the family's form); each PNG records `preview: true`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

from vaetool.errors import ConfigError, UsageError
from vaetool.jobs.common import ModelSpec

if TYPE_CHECKING:
    from vaetool.api import Vae

__all__ = ["PREVIEW_CONFIGS", "load_preview", "preview_family", "preview_spec"]

# family -> the shipped config of the TAESD distilled for it (what a user downloads for that family)
PREVIEW_CONFIGS: dict[str, str] = {"sd1": "taesd", "sd2": "taesd", "sdxl": "taesdxl", "sd3": "taesd3", "flux": "taef1"}
# ModelSpec fields that only say where the full VAE's weights are: given with --preview, they would be ignored
FULL_MODEL_ONLY: dict[str, str] = {
    "checkpoint": "--checkpoint",
    "subfolder": "--subfolder",
    "ema": "--ema",
    "random_weights": "--random-weights",
}
WITH_ONE = ", ".join(f"{family} ({name})" for family, name in PREVIEW_CONFIGS.items())


def preview_family(spec: ModelSpec) -> str:
    """The family a --preview TAESD decodes: --family, else the family the -m/--config config declares; UsageError otherwise."""
    from vaetool.config import load_vae_config
    from vaetool.hub import looks_like_repo_id

    family = spec.family
    if family is None:
        name = spec.config or spec.model
        if name is None or looks_like_repo_id(name):
            raise UsageError(
                "--preview needs the latents' family: name the full model with -m/--config (a shipped "
                f"config or YAML) or give --family (one of {WITH_ONE})"
            )
        declared = load_vae_config(name).latent_format
        if declared is None:
            raise UsageError(f"--preview: the config {name} does not declare its family; give --family (one of {WITH_ONE})")
        family = declared.family
    family = family.lower()
    if family not in PREVIEW_CONFIGS:
        raise UsageError(f"--preview: family {family} has no TAESD preview decoder; the families with one: {WITH_ONE}")
    return family


def preview_spec(spec: ModelSpec, checkpoint: str) -> ModelSpec:
    """The ModelSpec of a --preview run: the TAESD `checkpoint` for the family of `spec`, on its device, dtype and attention."""
    if spec.model is not None and spec.config is not None:
        raise ConfigError("give --model or --config, not both")
    given = [flag for name, flag in FULL_MODEL_ONLY.items() if getattr(spec, name) not in (None, False)]
    if given:
        raise UsageError(
            f"--preview decodes with the TAESD instead of the full VAE, whose weights are not read: leave out "
            f"{', '.join(given)} (-m/--config or --family name the family)"
        )
    return dataclasses.replace(spec, config=None, model=None, checkpoint=checkpoint, family=preview_family(spec), parts="decoder")


def load_preview(spec: ModelSpec, on_notice: Callable[[str], None] | None = None) -> Vae:
    """Load the TAESD of a preview_spec; a config error names the checkpoint, and a checkpoint that is not a TAESD
    is a UsageError (it is a full VAE: --checkpoint takes it)."""
    from vaetool.jobs.common import load_model
    from vaetool.nn.taesd import TAESD

    checkpoint = str(spec.checkpoint)
    try:
        vae = load_model(spec, on_notice)
    except ConfigError as err:  # e.g. a 4-channel TAESD for the 16-channel sd3 latents
        raise ConfigError(f"--preview: {err.problem}", err.path or checkpoint) from None
    if not isinstance(vae.model, TAESD):
        names = ", ".join(sorted(set(PREVIEW_CONFIGS.values())))
        raise UsageError(
            f"--preview takes a TAESD checkpoint ({names}); this is a full VAE ({type(vae.model).__name__}): give it with --checkpoint",
            checkpoint,
        )
    return vae
