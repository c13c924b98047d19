"""Flux.2 VAE checkpoints: detection, diffusers -> original keys, config from keys.

Original layout (Black Forest Labs' flux2 autoencoder): the LDM names of formats.md section 1,
with the quant convs inside the coders (`encoder.quant_conv`, `decoder.post_quant_conv`) and
`bn.running_mean` / `bn.running_var` (ComfyUI keys Flux.2 off `bn.running_mean`). diffusers
(AutoencoderKLFlux2): the diffusers AutoencoderKL names, top-level `quant_conv` /
`post_quant_conv`, and `bn.*` including `bn.num_batches_tracked`, a training counter that no
inference reads; it is dropped. The BatchNorm eps is not stored in either layout: both upstreams
use 1e-4.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from vaetool import keymaps
from vaetool.errors import CheckpointError
from vaetool.families import guess_families

NAME = "flux2"
MARKERS = ("bn.running_mean", "bn.running_var")
BN_EPS = 1e-4
STATS = ("bn.running_mean", "bn.running_var")
DROPPED = ("bn.num_batches_tracked",)
# top-level (LDM / diffusers) name -> original Flux.2 name
INTO_CODERS = {"quant_conv.": "encoder.quant_conv.", "post_quant_conv.": "decoder.post_quant_conv."}
CODERS = {"encoder": "vaetool.Flux2Encoder", "decoder": "vaetool.Flux2Decoder"}


def _split(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the LDM part, the bn statistics); an unknown bn.* key is an error."""
    stats = {k: v for k, v in sd.items() if k in STATS}
    unknown = sorted(k for k in sd if k.startswith("bn.") and k not in STATS and k not in DROPPED)
    if unknown:
        raise CheckpointError(f"unexpected Flux.2 BatchNorm key(s) {', '.join(unknown)} (only running_mean and running_var are used)")
    return {k: v for k, v in sd.items() if not k.startswith("bn.")}, stats


def _rename(key: str, table: dict[str, str]) -> str:
    return next((new + key[len(old):] for old, new in table.items() if key.startswith(old)), key)


def detect_layout(sd: dict[str, torch.Tensor]) -> str:
    """'original' or 'diffusers', from the LDM part's key names."""
    return keymaps.detect_layout(_split(sd)[0])


def to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Either layout -> original Flux.2 keys (LDM names, quant convs inside the coders, bn statistics)."""
    ldm, stats = _split(sd)
    converted = keymaps.to_original(ldm)
    return {_rename(k, INTO_CODERS): v for k, v in converted.items()} | stats


def config_from_state_dict(sd: dict[str, torch.Tensor], ldm_config: Callable[[dict[str, torch.Tensor]], dict[str, Any]]) -> dict[str, Any]:
    """The vaetool.Flux2Autoencoder config of an original-layout dict; `ldm_config` reads the LDM part."""
    out_of_coders = {new: old for old, new in INTO_CODERS.items()}
    ldm, stats = _split(sd)
    cfg = ldm_config({_rename(k, out_of_coders): v for k, v in ldm.items()})["params"]
    if not (cfg["use_quant_conv"] and cfg["use_post_quant_conv"]):
        raise CheckpointError("not a complete Flux.2 VAE: it needs encoder.quant_conv and decoder.post_quant_conv")
    for key in STATS:
        if key not in stats:
            raise CheckpointError(f"not a complete Flux.2 VAE: {key} is missing")
    z, n = cfg["embed_dim"], stats["bn.running_mean"].numel()
    patch = math.isqrt(n // z) if n % z == 0 else 0
    if patch < 1 or patch * patch * z != n or stats["bn.running_var"].numel() != n:
        raise CheckpointError(f"Flux.2 bn statistics have {n} channels, not {z} latent channels times a square patch")
    coders = {f"{part}_config": {"target": target, "params": cfg[f"{part}_config"]["params"]} for part, target in CODERS.items()}
    params = coders | {"patch_size": patch, "bn_eps": BN_EPS}
    return {"target": "vaetool.Flux2Autoencoder", "params": params}


def describe(config: dict[str, Any]) -> dict[str, Any]:
    """Architecture fields for `vaetool info`."""
    p = config["params"]
    enc = p["encoder_config"]["params"]
    z, patch, downscale = enc["z_channels"], p["patch_size"], 2 ** (len(enc["ch_mult"]) - 1)
    return {
        "latent_channels": z,
        "downscale": downscale,
        "patch_size": patch,
        "scaled_channels": z * patch * patch,
        "scaled_downscale": downscale * patch,
        "ch": enc["ch"],
        "ch_mult": enc["ch_mult"],
        "num_res_blocks": enc["num_res_blocks"],
        "mid_attention": enc["attn_type"] != "none",
        "candidate_families": guess_families(z, downscale, NAME),
    }
