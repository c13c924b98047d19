"""Key tables: diffusers AutoencoderKL / AutoencoderKLTemporalDecoder names -> original LDM/sgm names,
and diffusers UNet2DModel (the DDPM layout) -> the original DDPM `Model` (`unet_to_original`).

A diffusers key is `<container>.<suffix>`. CONTAINERS maps a container pattern to its original
name and says which suffix table applies; the SUFFIXES tables map the rest of the key. Named
groups in a container pattern are copied into the template; `rev` is the diffusers up-block index
(original index = levels - 1 - rev), `inc` a 0-based index that becomes 1-based and `dec` the reverse.
"""

from __future__ import annotations

import re

import torch

from vaetool.errors import CheckpointError

_LEAVES = ("weight", "bias")

_RES_PARTS: dict[str, str] = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}
# AutoencoderKLTemporalDecoder: SpatioTemporalResBlock = spatial ResnetBlock + temporal block + mixer
_TEMPORAL_PARTS: dict[str, str] = {
    "norm1": "time_stack.in_layers.0",
    "conv1": "time_stack.in_layers.2",
    "norm2": "time_stack.out_layers.0",
    "conv2": "time_stack.out_layers.3",
}
_ATTN_PARTS: dict[str, str] = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    "query": "q",  # older diffusers files
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}


def _with_leaves(parts: dict[str, str], prefix: str = "") -> dict[str, str]:
    return {f"{prefix}{d}.{leaf}": f"{o}.{leaf}" for d, o in parts.items() for leaf in _LEAVES}


SUFFIXES: dict[str, dict[str, str]] = {
    "plain": {leaf: leaf for leaf in _LEAVES},
    "res": _with_leaves(_RES_PARTS)
    | _with_leaves(_RES_PARTS, "spatial_res_block.")
    | _with_leaves(_TEMPORAL_PARTS, "temporal_res_block.")
    | {"time_mixer.mix_factor": "mix_factor"},
    "attn": _with_leaves(_ATTN_PARTS),
}

_C = r"(?P<c>encoder|decoder)"
# (diffusers container pattern, original container template, suffix table)
CONTAINERS: list[tuple[str, str, str]] = [
    (rf"{_C}\.(?P<n>conv_in|conv_out)", "{c}.{n}", "plain"),
    (rf"{_C}\.conv_norm_out", "{c}.norm_out", "plain"),
    (r"(?P<n>quant_conv|post_quant_conv)", "{n}", "plain"),
    (r"decoder\.time_conv_out", "decoder.conv_out.time_mix_conv", "plain"),
    (r"encoder\.down_blocks\.(?P<i>\d+)\.resnets\.(?P<j>\d+)", "encoder.down.{i}.block.{j}", "res"),
    (r"encoder\.down_blocks\.(?P<i>\d+)\.attentions\.(?P<j>\d+)", "encoder.down.{i}.attn.{j}", "attn"),
    (r"encoder\.down_blocks\.(?P<i>\d+)\.downsamplers\.0\.conv", "encoder.down.{i}.downsample.conv", "plain"),
    (r"decoder\.up_blocks\.(?P<rev>\d+)\.resnets\.(?P<j>\d+)", "decoder.up.{rev}.block.{j}", "res"),
    (r"decoder\.up_blocks\.(?P<rev>\d+)\.attentions\.(?P<j>\d+)", "decoder.up.{rev}.attn.{j}", "attn"),
    (r"decoder\.up_blocks\.(?P<rev>\d+)\.upsamplers\.0\.conv", "decoder.up.{rev}.upsample.conv", "plain"),
    (rf"{_C}\.mid_block\.resnets\.(?P<inc>\d+)", "{c}.mid.block_{inc}", "res"),
    (rf"{_C}\.mid_block\.attentions\.0", "{c}.mid.attn_1", "attn"),
]
_COMPILED = [(re.compile(rf"{pat}\.(?P<suffix>.+)"), tmpl, SUFFIXES[table]) for pat, tmpl, table in CONTAINERS]

# original-layout attention projections (1x1 convs; some files store them as Linear / Conv1d)
ATTN_PROJ = re.compile(r"(encoder|decoder)\.(mid\.attn_1|(down|up)\.\d+\.attn\.\d+)\.(q|k|v|proj_out)\.weight")

# Which layout a key belongs to: (layout, pattern searched in each key). Order matters: the
# temporal markers are also diffusers markers.
LAYOUT_MARKERS: list[tuple[str, re.Pattern[str]]] = [
    ("diffusers-temporal", re.compile(r"\.(spatial_res_block|temporal_res_block|time_mixer)\.|^decoder\.time_conv_out\.")),
    ("diffusers", re.compile(r"\.(down_blocks|up_blocks|mid_block|conv_norm_out)\.")),
    ("original", re.compile(r"\.(down|up)\.\d+\.|\.mid\.(block_\d|attn_1)\.|^(encoder|decoder)\.norm_out\.")),
]


def detect_layout(sd: dict[str, torch.Tensor]) -> str:
    """'original', 'diffusers' or 'diffusers-temporal', from the key names of a prefix-free VAE dict."""
    found = {layout for layout, pat in LAYOUT_MARKERS for k in sd if pat.search(k)}
    if "diffusers-temporal" in found:
        found.discard("diffusers")
    if len(found) != 1:
        what = "both original and diffusers key names" if found else "neither original nor diffusers VAE key names"
        raise CheckpointError(f"cannot tell the key layout: it has {what} (e.g. {', '.join(sorted(sd)[:4])})")
    return found.pop()


def _num_up_levels(sd: dict[str, torch.Tensor]) -> int:
    levels = {int(m.group(1)) for k in sd if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))}
    return max(levels) + 1 if levels else 0


def _attn_to_4d(key: str, value: torch.Tensor) -> torch.Tensor:
    """Linear [C, C] or Conv1d [C, C, 1] attention weights -> Conv2d [C, C, 1, 1]."""
    if ATTN_PROJ.fullmatch(key) and value.ndim in (2, 3):
        return value.reshape(*value.shape[:2], 1, 1)  # [C, C(, 1)] -> [C, C, 1, 1]
    return value


def _map_key(key: str, levels: int, table: list | None = None) -> str | None:
    for pattern, template, suffixes in _COMPILED if table is None else table:
        m = pattern.fullmatch(key)
        if m is None or m["suffix"] not in suffixes:
            continue
        groups = {k: v for k, v in m.groupdict().items() if v is not None}
        if "rev" in groups:
            groups["rev"] = str(levels - 1 - int(groups["rev"]))
        if "inc" in groups:
            groups["inc"] = str(int(groups["inc"]) + 1)
        if "dec" in groups:
            groups["dec"] = str(int(groups["dec"]) - 1)
        return f"{template.format(**groups)}.{suffixes[m['suffix']]}"
    return None


def to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any supported layout -> original LDM/sgm keys, attention weights as 4-D; unmapped keys are an error."""
    if detect_layout(sd) == "original":
        return {k: _attn_to_4d(k, v) for k, v in sd.items()}
    levels = _num_up_levels(sd)
    out: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for key, value in sd.items():
        new = _map_key(key, levels)
        if new is None:
            unmapped.append(key)
        elif new in out:
            raise CheckpointError(f"two diffusers keys map to {new} (old and new attention names mixed?)")
        else:
            out[new] = _attn_to_4d(new, value)
    if unmapped:
        raise CheckpointError(
            f"{len(unmapped)} diffusers key(s) have no original-layout equivalent: {', '.join(sorted(unmapped)[:5])}"
        )
    return out


# diffusers UNet2DModel with DownBlock2D / AttnDownBlock2D, UpBlock2D / AttnUpBlock2D and UNetMidBlock2D
_UNET_SUFFIXES: dict[str, dict[str, str]] = {
    "plain": SUFFIXES["plain"],
    "res": _with_leaves(_RES_PARTS | {"time_emb_proj": "temb_proj"}),
    "attn": SUFFIXES["attn"],
}
UNET_CONTAINERS: list[tuple[str, str, str]] = [
    (r"(?P<n>conv_in|conv_out)", "{n}", "plain"),
    (r"conv_norm_out", "norm_out", "plain"),
    (r"time_embedding\.linear_(?P<dec>\d+)", "temb.dense.{dec}", "plain"),
    (r"down_blocks\.(?P<i>\d+)\.resnets\.(?P<j>\d+)", "down.{i}.block.{j}", "res"),
    (r"down_blocks\.(?P<i>\d+)\.attentions\.(?P<j>\d+)", "down.{i}.attn.{j}", "attn"),
    (r"down_blocks\.(?P<i>\d+)\.downsamplers\.0\.conv", "down.{i}.downsample.conv", "plain"),
    (r"up_blocks\.(?P<rev>\d+)\.resnets\.(?P<j>\d+)", "up.{rev}.block.{j}", "res"),
    (r"up_blocks\.(?P<rev>\d+)\.attentions\.(?P<j>\d+)", "up.{rev}.attn.{j}", "attn"),
    (r"up_blocks\.(?P<rev>\d+)\.upsamplers\.0\.conv", "up.{rev}.upsample.conv", "plain"),
    (r"mid_block\.resnets\.(?P<inc>\d+)", "mid.block_{inc}", "res"),
    (r"mid_block\.attentions\.0", "mid.attn_1", "attn"),
]
_UNET_COMPILED = [(re.compile(rf"{pat}\.(?P<suffix>.+)"), tmpl, _UNET_SUFFIXES[t]) for pat, tmpl, t in UNET_CONTAINERS]
UNET_ATTN_PROJ = re.compile(r"(mid\.attn_1|(down|up)\.\d+\.attn\.\d+)\.(q|k|v|proj_out)\.weight")


def unet_to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers UNet2DModel state dict (DDPM layout) -> vaetool.nn.unet.Model keys; unmapped keys are an error."""
    levels = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"up_blocks\.(\d+)\.", k))), default=-1)
    out: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for key, value in sd.items():
        new = _map_key(key, levels, _UNET_COMPILED)
        if new is None:
            unmapped.append(key)
            continue
        out[new] = value.reshape(*value.shape, 1, 1) if UNET_ATTN_PROJ.fullmatch(new) and value.ndim == 2 else value
    if unmapped:
        raise CheckpointError(f"{len(unmapped)} UNet2DModel key(s) have no DDPM-layout equivalent: {', '.join(sorted(unmapped)[:5])}")
    return out
