"""Wan 2.1 / Qwen-Image VAE checkpoints: detection, diffusers -> original keys, config from keys.

Original layout (wan/modules/vae.py, ComfyUI): `encoder.conv1`, `encoder.downsamples.N`,
`encoder.middle.{0,1,2}`, `encoder.head.{0,2}`, `conv1`, `conv2`, `decoder.conv1`,
`decoder.middle.*`, `decoder.upsamples.N`, `decoder.head.*`. diffusers (AutoencoderKLWan and
AutoencoderKLQwenImage share one layout): `conv_in`, `down_blocks.N` (same flat index),
`mid_block.{resnets,attentions}`, `norm_out`, `conv_out`, `quant_conv`, `post_quant_conv`, and
the decoder's `up_blocks.i.{resnets.j, upsamplers.0}` (flat index i * (blocks + 1) + j).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from vaetool.archs.rename import LEAF, alternatives, compile_rules, layout_from_markers, rename
from vaetool.errors import CheckpointError
from vaetool.families import guess_families

NAME = "wan"
# any of these keys marks a Wan VAE (ComfyUI keys the original layout off the first)
MARKERS = ("decoder.middle.0.residual.0.gamma", "encoder.middle.0.residual.0.gamma",
           "decoder.mid_block.resnets.0.norm1.gamma", "encoder.mid_block.resnets.0.norm1.gamma")
LAYOUTS: dict[str, re.Pattern[str]] = {
    "original": re.compile(r"^(encoder|decoder)\.(conv1|middle|downsamples|upsamples|head)\.|^conv[12]\."),
    "diffusers": re.compile(r"^(encoder|decoder)\.(conv_in|mid_block|down_blocks|up_blocks|norm_out|conv_out)\.|^(post_)?quant_conv\."),
}
# diffusers WanResidualBlock part -> original ResidualBlock part
RES_PARTS: dict[str, str] = {
    "norm1.gamma": "residual.0.gamma",
    "conv1.weight": "residual.2.weight",
    "conv1.bias": "residual.2.bias",
    "norm2.gamma": "residual.3.gamma",
    "conv2.weight": "residual.6.weight",
    "conv2.bias": "residual.6.bias",
    "conv_shortcut.weight": "shortcut.weight",
    "conv_shortcut.bias": "shortcut.bias",
}
_RES = rf"(?P<part>{alternatives(list(RES_PARTS))})"
_KEEP = r"(?P<rest>(resample\.1|time_conv|to_qkv|proj)\.(weight|bias)|norm\.gamma)"  # same name in both layouts
_C = r"(?P<c>encoder|decoder)"
# a key that tells what module sits at a flat index, checked in this order
KIND_MARKERS = (("residual.0.gamma", "res"), ("time_conv.weight", "3d"), ("resample.1.weight", "2d"), ("to_qkv.weight", "attn"))


def _res(m: re.Match[str], base: str) -> str:
    return f"{base}.{RES_PARTS[m['part']]}"


def _rules(per_level: int) -> list[tuple[re.Pattern[str], Any]]:
    """Rename rules; `per_level` = residual blocks + 1 (the upsample) per decoder level."""
    return compile_rules([
        (rf"{_C}\.conv_in\.{LEAF}", "{c}.conv1.{leaf}"),
        (rf"{_C}\.norm_out\.gamma", "{c}.head.0.gamma"),
        (rf"{_C}\.conv_out\.{LEAF}", "{c}.head.2.{leaf}"),
        (rf"quant_conv\.{LEAF}", "conv1.{leaf}"),
        (rf"post_quant_conv\.{LEAF}", "conv2.{leaf}"),
        (rf"{_C}\.mid_block\.resnets\.(?P<j>[01])\.{_RES}", lambda m: _res(m, f"{m['c']}.middle.{2 * int(m['j'])}")),
        (rf"{_C}\.mid_block\.attentions\.0\.{_KEEP}", "{c}.middle.1.{rest}"),
        (rf"encoder\.down_blocks\.(?P<n>\d+)\.{_RES}", lambda m: _res(m, f"encoder.downsamples.{m['n']}")),
        (rf"encoder\.down_blocks\.(?P<n>\d+)\.{_KEEP}", "encoder.downsamples.{n}.{rest}"),
        (rf"decoder\.up_blocks\.(?P<i>\d+)\.resnets\.(?P<j>\d+)\.{_RES}",
         lambda m: _res(m, f"decoder.upsamples.{int(m['i']) * per_level + int(m['j'])}")),
        (rf"decoder\.up_blocks\.(?P<i>\d+)\.upsamplers\.0\.{_KEEP}",
         lambda m: f"decoder.upsamples.{int(m['i']) * per_level + per_level - 1}.{m['rest']}"),
    ])


def detect_layout(sd: dict[str, torch.Tensor]) -> str:
    """'original' or 'diffusers' for a Wan VAE dict."""
    return layout_from_markers(sd, LAYOUTS, "Wan VAE")


def to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Either layout -> original Wan keys (original input is returned as is)."""
    if detect_layout(sd) == "original":
        return dict(sd)
    resnets = {int(m[1]) for k in sd if (m := re.match(r"decoder\.up_blocks\.0\.resnets\.(\d+)\.", k))}
    return rename(sd, _rules(len(resnets) + 1), "Wan diffusers")


def _shape(sd: dict[str, torch.Tensor], key: str) -> torch.Size:
    if key not in sd:
        raise CheckpointError(f"not a complete Wan VAE: {key} is missing")
    return sd[key].shape


def _sequence(sd: dict[str, torch.Tensor], prefix: str) -> list[str]:
    """Kinds of the modules in a flat Sequential: 'res', 'attn', or a Resample ('2d' / '3d')."""
    found = sorted({int(m[1]) for k in sd if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", k))})
    if found != list(range(len(found))) or not found:
        raise CheckpointError(f"the Wan VAE's {prefix}.N indices are missing or have gaps: {found}")
    kinds = [next((kind for part, kind in KIND_MARKERS if f"{prefix}.{i}.{part}" in sd), "?") for i in found]
    if "?" in kinds:
        raise CheckpointError(f"unrecognised module at {prefix}.{kinds.index('?')} (not a residual block, resample or attention)")
    if "attn" in kinds:
        raise CheckpointError(f"attention inside {prefix} (attn_scales) is not supported; Wan 2.1 has none")
    return kinds


def _levels(kinds: list[str]) -> tuple[list[int], list[bool]]:
    """Residual blocks per level and whether each resample between levels is temporal."""
    counts, temporal, n = [], [], 0
    for kind in kinds:
        if kind == "res":
            n += 1
        else:
            counts.append(n)
            temporal.append(kind == "3d")
            n = 0
    return [*counts, n], temporal


def config_from_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The vaetool.WanVAE config that fits an original-layout Wan VAE dict."""
    dim, in_channels = _shape(sd, "encoder.conv1.weight")[:2]
    z_dim = _shape(sd, "conv2.weight")[0]
    enc_counts, temporal = _levels(_sequence(sd, "encoder.downsamples"))
    dec_counts, dec_temporal = _levels(_sequence(sd, "decoder.upsamples"))
    if len(set(enc_counts)) != 1 or set(dec_counts) != {enc_counts[0] + 1} or dec_temporal != temporal[::-1]:
        raise CheckpointError(
            f"the Wan decoder does not mirror the encoder (encoder blocks {enc_counts}, temporal {temporal}; "
            f"decoder blocks {dec_counts}, temporal {dec_temporal})"
        )
    nrb = enc_counts[0]
    widths = [_shape(sd, f"encoder.downsamples.{level * (nrb + 1)}.residual.2.weight")[0] for level in range(len(enc_counts))]
    if any(w % dim for w in widths):
        raise CheckpointError(f"Wan encoder widths {widths} are not multiples of dim={dim}")
    if _shape(sd, "encoder.head.2.weight")[0] != 2 * z_dim or _shape(sd, "decoder.conv1.weight")[1] != z_dim:
        head = sd["encoder.head.2.weight"].shape[0]
        raise CheckpointError(f"inconsistent latent channels: encoder head gives {head}, conv2 takes {z_dim}")
    params = {
        "dim": int(dim), "z_dim": int(z_dim), "dim_mult": [int(w // dim) for w in widths], "num_res_blocks": nrb,
        "temperal_downsample": temporal, "in_channels": int(in_channels), "out_channels": int(_shape(sd, "decoder.head.2.weight")[0]),
    }
    return {"target": "vaetool.WanVAE", "params": params}


def describe(config: dict[str, Any]) -> dict[str, Any]:
    """Architecture fields for `vaetool info`."""
    p = config["params"]
    return {
        "latent_channels": p["z_dim"],
        "downscale": 2 ** (len(p["dim_mult"]) - 1),
        "time_downscale": 2 ** sum(p["temperal_downsample"]),
        "dim": p["dim"],
        "dim_mult": p["dim_mult"],
        "num_res_blocks": p["num_res_blocks"],
        "temperal_downsample": p["temperal_downsample"],
        "candidate_families": guess_families(p["z_dim"], 2 ** (len(p["dim_mult"]) - 1), NAME),
    }
