"""TAESD checkpoints (taesd, taesdxl, taesd3, taef1): detection, diffusers -> original keys, config.

Original layout (madebyollin/taesd's TAESD module): `encoder.N...` and `decoder.N...`, the
indices of its nn.Sequential stacks; the decoder's index 0 is the parameter-free Clamp. diffusers
(AutoencoderTiny, also madebyollin's .safetensors files): `encoder.layers.N` with the same indices
and `decoder.layers.N` for original `decoder.{N+1}` (diffusers clamps in forward instead).
Keys cannot tell which family a TAESD was distilled for (taesd vs taesdxl, taesd3 vs taef1): the
config built here leaves `family` unset, and such a model refuses to encode or decode until a
config (or params.family) names it.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from vaetool.archs.rename import compile_rules, layout_from_markers, rename
from vaetool.errors import CheckpointError
from vaetool.families import FAMILIES
from vaetool.nn.taesd import PARENTS

NAME = "taesd"
MARKER = re.compile(r"^(encoder|decoder)\.(layers\.)?\d+\.conv\.0\.weight$")  # a TAESD Block's first conv
LAYOUTS: dict[str, re.Pattern[str]] = {
    "original": re.compile(r"^(encoder|decoder)\.\d+\."),
    "diffusers": re.compile(r"^(encoder|decoder)\.layers\.\d+\."),
}
RULES = compile_rules([
    (r"encoder\.layers\.(?P<n>\d+)\.(?P<rest>.+)", "encoder.{n}.{rest}"),
    (r"decoder\.layers\.(?P<n>\d+)\.(?P<rest>.+)", lambda m: f"decoder.{int(m['n']) + 1}.{m['rest']}"),
])


def is_taesd(sd: dict[str, torch.Tensor]) -> bool:
    """Whether any key is a TAESD Block's conv."""
    return any(MARKER.match(k) for k in sd)


def detect_layout(sd: dict[str, torch.Tensor]) -> str:
    """'original' or 'diffusers' for a TAESD dict."""
    return layout_from_markers(sd, LAYOUTS, "TAESD")


def to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Either layout -> original TAESD keys (original input is returned as is)."""
    return dict(sd) if detect_layout(sd) == "original" else rename(sd, RULES, "TAESD diffusers")


def _layers(sd: dict[str, torch.Tensor], coder: str) -> list[tuple[int, str]]:
    """(index, 'block' or 'conv') of each parameterised layer of a coder, in order."""
    found = sorted({int(m[1]) for k in sd if (m := re.match(rf"{coder}\.(\d+)\.", k))})
    if not found:
        raise CheckpointError(f"not a complete TAESD: no {coder}.N keys")
    return [(i, "block" if f"{coder}.{i}.conv.0.weight" in sd else "conv") for i in found]


def _stages(layers: list[tuple[int, str]], coder: str) -> list[int]:
    """Blocks per stage: the convs between the first and the last layer separate the stages."""
    kinds = [kind for _, kind in layers]
    if len(kinds) < 3 or kinds[0] != "conv" or kinds[-1] != "conv":
        raise CheckpointError(f"unrecognised TAESD {coder}: it should start and end with a conv, got {kinds}")
    counts, n = [], 0
    for kind in kinds[1:-1]:
        if kind == "conv":
            counts.append(n)
            n = 0
        else:
            n += 1
    return [*counts, n]


def config_from_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The vaetool.TAESD config of an original-layout dict (family unset: keys cannot tell it)."""
    enc, dec = _layers(sd, "encoder"), _layers(sd, "decoder")
    first, last = f"encoder.{enc[0][0]}.weight", f"encoder.{enc[-1][0]}.weight"
    if first not in sd or last not in sd:
        raise CheckpointError(f"not a complete TAESD: {first if first not in sd else last} is missing")
    params = {
        "latent_channels": int(sd[last].shape[0]),
        "channels": int(sd[first].shape[0]),
        "encoder_blocks": _stages(enc, "encoder"),
        "decoder_blocks": _stages(dec, "decoder"),
        "family": None,
    }
    return {"target": "vaetool.TAESD", "params": params}


def describe(config: dict[str, Any]) -> dict[str, Any]:
    """Architecture fields for `vaetool info`."""
    p = config["params"]
    c = p["latent_channels"]
    return {
        "latent_channels": c,
        "downscale": 2 ** (len(p["encoder_blocks"]) - 1),
        "channels": p["channels"],
        "encoder_blocks": p["encoder_blocks"],
        "decoder_blocks": p["decoder_blocks"],
        "candidate_families": [f for f in PARENTS if FAMILIES[f].channels == c],
    }
