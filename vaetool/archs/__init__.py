"""The VAE architectures beyond the LDM AutoencoderKL family, told apart by their keys alone.

Each Architecture knows its marker keys (in the original and in diffusers' layout), which layout
a dict is in, how to rename diffusers keys to the original repo's, the vaetool model config that
fits an original-layout dict, and what `vaetool info` shows. checkpoints.py asks
`find_architecture` first and falls back to the LDM path (keymaps.py) when none claims the keys.

| architecture | original layout marker (ComfyUI's) | diffusers class |
|---|---|---|
| wan (Wan 2.1, Qwen-Image) | decoder.middle.0.residual.0.gamma | AutoencoderKLWan, AutoencoderKLQwenImage |
| flux2 | bn.running_mean | AutoencoderKLFlux2 |
| taesd (taesd, taesdxl, taesd3, taef1) | encoder.N.conv.0.weight | AutoencoderTiny |
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from vaetool.archs import flux2, taesd, wan
from vaetool.errors import CheckpointError

StateDict = dict[str, torch.Tensor]
LdmConfig = Callable[[StateDict], dict[str, Any]]  # checkpoints.config_from_state_dict, for LDM-based archs

# keys that show where such a VAE starts inside a bigger file (extract_vae's prefix search) and the
# top-level names its keys may start with besides encoder./decoder.
VAE_MARKERS = (*wan.MARKERS, "encoder.1.conv.0.weight", "decoder.3.conv.0.weight",
               "encoder.layers.1.conv.0.weight", "decoder.layers.2.conv.0.weight")
VAE_ROOTS = ("conv1.", "conv2.", "bn.")


@dataclass(frozen=True)
class Architecture:
    """One architecture's key handling; `config` gets the LDM config reader for LDM-based ones."""

    name: str
    claims: Callable[[StateDict], bool]
    detect_layout: Callable[[StateDict], str]
    to_original: Callable[[StateDict], StateDict]
    config: Callable[[StateDict, LdmConfig], dict[str, Any]]
    describe: Callable[[dict[str, Any]], dict[str, Any]]


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(wan.NAME, lambda sd: any(k in sd for k in wan.MARKERS), wan.detect_layout, wan.to_original,
                 lambda sd, _ldm: wan.config_from_state_dict(sd), wan.describe),
    Architecture(flux2.NAME, lambda sd: any(k in sd for k in flux2.MARKERS), flux2.detect_layout, flux2.to_original,
                 flux2.config_from_state_dict, flux2.describe),
    Architecture(taesd.NAME, taesd.is_taesd, taesd.detect_layout, taesd.to_original,
                 lambda sd, _ldm: taesd.config_from_state_dict(sd), taesd.describe),
)


def find_architecture(sd: StateDict) -> Architecture | None:
    """The architecture whose marker keys the dict has; None for the LDM family; an error if several claim it."""
    found = [a for a in ARCHITECTURES if a.claims(sd)]
    if len(found) > 1:
        raise CheckpointError(f"the keys fit several VAE architectures ({', '.join(a.name for a in found)})")
    return found[0] if found else None


def convert(arch: Architecture, sd: StateDict, ldm_config: LdmConfig) -> tuple[str, StateDict, dict[str, Any]]:
    """(layout, original-layout dict, model config) of a prefix-free dict of architecture `arch`."""
    layout = arch.detect_layout(sd)
    original = arch.to_original(sd)
    return layout, original, arch.config(original, ldm_config)
