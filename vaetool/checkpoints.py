"""Checkpoint files -> an original-layout VAE state dict plus the model config that fits it.

read_state_dict (safetensors, or pickles through torch.load(weights_only=True) only) ->
extract_vae (unwrap nesting, find the VAE prefix, optional EMA weights) -> to_original
(diffusers names -> LDM/sgm names, see keymaps.py) -> config_from_state_dict (architecture from
key names and shapes). The Wan, Flux.2 and TAESD architectures take their own path at the
renaming and config steps (vaetool.archs; `convert_any` picks). load_into checks every key and
shape before loading into a model. No model is built here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from vaetool.archs import VAE_MARKERS as ARCH_MARKERS
from vaetool.archs import VAE_ROOTS as ARCH_ROOTS
from vaetool.archs import convert, find_architecture
from vaetool.errors import CheckpointError
from vaetool.families import LatentFormat, guess_families
from vaetool.io.safe import load_weights_only, looks_like_safetensors, read_safetensors, safetensors_header
from vaetool.io.sniff import sniff
from vaetool.keymaps import detect_layout, to_original

__all__ = [
    "Extracted", "LoadedCheckpoint", "config_from_state_dict", "convert_any", "describe", "detect_layout",
    "extract_vae", "load_checkpoint", "load_into", "read_safetensors_metadata", "read_state_dict", "to_original",
]

SAFETENSORS_SUFFIXES = {".safetensors", ".sft"}
# where the VAE lives inside a file, in order of preference
VAE_PREFIXES = ("", "first_stage_model.", "vae.", "model.", "conditioner.embedders.1.encoder.")
VAE_ROOTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", *ARCH_ROOTS)
VAE_MARKERS = ("encoder.conv_in.weight", "decoder.conv_in.weight", *ARCH_MARKERS)  # one of these shows the prefix
WRAPPERS = ("model", "module")  # {"model": {...}} is unwrapped when it is the only key
EMA_PREFIX = "model_ema."  # LitEma: model_ema.<parameter name without dots>, .decay, .num_updates
RESOLUTION = 256  # nominal; only used to express attn_resolutions
# (video res blocks, video attention, AE3DConv) present -> sgm VideoDecoder time_mode
TIME_MODES: dict[tuple[bool, bool, bool], str] = {
    (True, True, True): "all",
    (True, False, True): "conv-only",
    (False, True, False): "attn-only",
    (False, False, True): "only-last-conv",
}


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The `__metadata__` strings of a safetensors file ({} when it has none)."""
    return safetensors_header(Path(path), CheckpointError)[1]


def read_state_dict(path: str | Path, skip: Callable[[str], bool] | None = None) -> dict[str, Any]:
    """Read a .safetensors file, or a .ckpt/.pt/.pth/.bin pickle with weights_only; the raw top-level dict.

    Safetensors keys for which `skip(key)` is true come back as meta tensors (shape and dtype, no data);
    a torch zip file is memory-mapped, so tensors nobody uses are never read.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError("no such file", path)
    if path.is_dir():
        raise CheckpointError("is a directory; pass the checkpoint file inside it", path)
    try:
        if path.stat().st_size == 0:
            raise CheckpointError("empty file (0 bytes)", path)
        if (kind := sniff(path)) is not None:  # a PNG, a YAML, a zip of something else: named, not unpickled
            hint = "; pass a YAML config with --config" if path.suffix.lower() in (".yaml", ".yml") else ""
            raise CheckpointError(f"not a checkpoint file ({kind}){hint}", path)
        suffix = path.suffix.lower()
        if suffix in SAFETENSORS_SUFFIXES or looks_like_safetensors(path):  # renamed files too
            obj: Any = read_safetensors(path, CheckpointError, skip=skip)
        else:
            obj = load_weights_only(path, CheckpointError, "checkpoint file")
    except OSError as err:
        raise CheckpointError(f"cannot read: {err.strerror or err}", path) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"holds a {type(obj).__name__}, not a state dict", path)
    return obj


@dataclass
class Extracted:
    """The VAE part of a checkpoint: prefix-free keys, the prefix it had, and what EMA offered."""

    state_dict: dict[str, torch.Tensor]
    prefix: str
    has_ema: bool
    used_ema: bool


def _unwrap(obj: dict[str, Any]) -> dict[str, Any]:
    while True:
        if isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        elif len(obj) == 1 and next(iter(obj)) in WRAPPERS and isinstance(next(iter(obj.values())), dict):
            obj = next(iter(obj.values()))
        else:
            return obj


def extract_vae(sd: dict[str, Any], *, ema: bool = False) -> Extracted:
    """Find the VAE weights (by prefix table) in a raw checkpoint dict; with ema=True use its model_ema copies."""
    tensors = {k: v for k, v in _unwrap(sd).items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    prefix = next((p for p in VAE_PREFIXES if any(f"{p}{marker}" in tensors for marker in VAE_MARKERS)), None)
    if prefix is None:
        seen = ", ".join(sorted(tensors)[:5]) or "no tensors at all"
        tried = ", ".join(repr(p) for p in VAE_PREFIXES)
        raise CheckpointError(f"no VAE weights found (no encoder/decoder keys under prefixes {tried}; keys seen: {seen})")
    vae = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix) and k[len(prefix):].startswith(VAE_ROOTS)}
    # LitEma names a copy by the parameter name with its dots removed (relative to the module it wraps)
    ema_copies: dict[str, torch.Tensor] = {}
    for key in vae:
        for name in (key, prefix + key):
            if (copy := tensors.get(EMA_PREFIX + name.replace(".", ""))) is not None:
                ema_copies[key] = copy
                break
    if ema and not ema_copies:
        raise CheckpointError("EMA weights requested but the checkpoint has no model_ema copies of the VAE parameters")
    if ema:
        for key, copy in ema_copies.items():
            if copy.shape != vae[key].shape:
                raise CheckpointError(f"EMA copy of {key} has shape {list(copy.shape)}, the weight {list(vae[key].shape)}")
        vae |= ema_copies
    return Extracted(vae, prefix, has_ema=bool(ema_copies), used_ema=ema)


def _shape(sd: dict[str, torch.Tensor], key: str) -> torch.Size:
    if key not in sd:
        raise CheckpointError(f"not a complete VAE: {key} is missing")
    return sd[key].shape


def _indices(sd: dict[str, torch.Tensor], pattern: str) -> list[int]:
    """Sorted distinct integers captured by `pattern` (one group) over the keys; must be 0..n-1."""
    found = sorted({int(m[1]) for k in sd if (m := re.match(pattern, k))})
    if found != list(range(len(found))):
        raise CheckpointError(f"keys matching {pattern} have gaps in their indices: {found}")
    return found


def _coder_params(sd: dict[str, torch.Tensor], coder: str, ch: int) -> dict[str, Any]:
    """ch_mult, num_res_blocks, attn_resolutions, attn_type of the encoder ('down') or decoder ('up')."""
    level = "down" if coder == "encoder" else "up"
    levels = _indices(sd, rf"{coder}\.{level}\.(\d+)\.")
    if not levels:
        raise CheckpointError(f"not a complete VAE: no {coder}.{level}.* keys")
    for block in ("block_1", "block_2"):
        _shape(sd, f"{coder}.mid.{block}.conv1.weight")
    widths = [_shape(sd, f"{coder}.{level}.{i}.block.0.conv1.weight")[0] for i in levels]  # ch * ch_mult[i]
    if any(w % ch for w in widths):
        raise CheckpointError(f"{coder} block widths {widths} are not multiples of ch={ch}")
    blocks = {len(_indices(sd, rf"{coder}\.{level}\.{i}\.block\.(\d+)\.")) for i in levels}
    if len(blocks) != 1:
        raise CheckpointError(f"{coder} levels have different numbers of res blocks: {sorted(blocks)}")
    num_res_blocks = blocks.pop() - (coder == "decoder")  # the decoder has one more block per level
    attn_levels = [i for i in levels if any(k.startswith(f"{coder}.{level}.{i}.attn.") for k in sd)]
    attn_type = "vanilla" if f"{coder}.mid.attn_1.q.weight" in sd else "none"
    if attn_type == "none" and (attn_levels or any(k.startswith(f"{coder}.mid.attn_1.") for k in sd)):
        raise CheckpointError(f"unrecognised {coder} attention (no {coder}.mid.attn_1.q.weight)")
    return {
        "ch": ch,
        "ch_mult": [w // ch for w in widths],
        "num_res_blocks": num_res_blocks,
        "attn_resolutions": [RESOLUTION // 2**i for i in attn_levels],
        "attn_type": attn_type,
    }


def _video_params(sd: dict[str, torch.Tensor]) -> dict[str, Any] | None:
    """VideoDecoder extras (time_mode, kernel size) from the temporal keys; None for an image decoder."""
    flags = (
        "decoder.mid.block_1.mix_factor" in sd,
        any(k.startswith("decoder.mid.attn_1.time_mix_block.") for k in sd),
        "decoder.conv_out.time_mix_conv.weight" in sd,
    )
    if not any(flags):
        return None
    if flags not in TIME_MODES:
        raise CheckpointError(f"unrecognised temporal decoder (video res blocks, attention, conv_out = {flags})")
    kernel_keys = ("decoder.conv_out.time_mix_conv.weight", "decoder.mid.block_1.time_stack.in_layers.2.weight")
    kernel = next((list(sd[k].shape[2:]) for k in kernel_keys if k in sd), [3, 1, 1])  # Conv3d [C, C, kt, kh, kw]
    return {"video_kernel_size": kernel, "time_mode": TIME_MODES[flags], "merge_strategy": "learned"}


def config_from_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The vaetool model config (AutoencodingEngine target/params dict) that fits an original-layout VAE dict."""
    ch = _shape(sd, "encoder.conv_in.weight")[0]  # one ch for both coders, as in a shared ddconfig
    enc, dec = _coder_params(sd, "encoder", ch), _coder_params(sd, "decoder", ch)
    in_channels = _shape(sd, "encoder.conv_in.weight")[1]
    enc_out = _shape(sd, "encoder.conv_out.weight")[0]
    z = _shape(sd, "decoder.conv_in.weight")[1]
    use_quant, use_post = "quant_conv.weight" in sd, "post_quant_conv.weight" in sd
    moments = _shape(sd, "quant_conv.weight")[0] if use_quant else enc_out  # channels the regularizer splits
    if use_post:
        embed_dim, z = _shape(sd, "post_quant_conv.weight")[1], _shape(sd, "post_quant_conv.weight")[0]
    else:
        embed_dim = z  # the regularizer output goes straight into decoder.conv_in
    double_z = {z: False, 2 * z: True}.get(enc_out)
    if double_z is None or moments != (2 if double_z else 1) * embed_dim or z != _shape(sd, "decoder.conv_in.weight")[1]:
        raise CheckpointError(
            f"inconsistent latent channels: encoder.conv_out gives {enc_out}, quant conv {moments}, "
            f"decoder.conv_in takes {_shape(sd, 'decoder.conv_in.weight')[1]}"
        )
    common = {"double_z": double_z, "z_channels": z, "resolution": RESOLUTION, "in_channels": in_channels}
    enc_params = common | {"out_ch": _shape(sd, "decoder.conv_out.weight")[0]} | enc | {"dropout": 0.0}
    dec_params = common | {"out_ch": _shape(sd, "decoder.conv_out.weight")[0]} | dec | {"dropout": 0.0}
    video = _video_params(sd)
    if video:
        dec_params |= video
    return {
        "target": "vaetool.AutoencodingEngine",
        "params": {
            "encoder_config": {"target": "vaetool.Encoder", "params": enc_params},
            "decoder_config": {"target": "vaetool.VideoDecoder" if video else "vaetool.Decoder", "params": dec_params},
            "regularizer_config": {"target": "vaetool.DiagonalGaussianRegularizer"},
            "use_quant_conv": use_quant,
            "use_post_quant_conv": use_post,
            "embed_dim": embed_dim,
        },
    }


def _counts(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    dtypes: dict[str, int] = {}
    for v in sd.values():
        dtypes[str(v.dtype).removeprefix("torch.")] = dtypes.get(str(v.dtype).removeprefix("torch."), 0) + 1
    return {"tensors": len(sd), "parameters": sum(v.numel() for v in sd.values()), "dtypes": dtypes}


def convert_any(sd: dict[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
    """(layout, original-layout dict, model config) of a prefix-free VAE dict of any supported architecture."""
    if (arch := find_architecture(sd)) is not None:
        return convert(arch, sd, config_from_state_dict)
    original = to_original(sd)
    return detect_layout(sd), original, config_from_state_dict(original)


def describe(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Layout, architecture summary, parameter count and dtypes of a prefix-free VAE state dict (for `info`)."""
    if (arch := find_architecture(sd)) is not None:
        layout, _, config = convert(arch, sd, config_from_state_dict)
        return {"layout": layout, "architecture": arch.name} | _counts(sd) | arch.describe(config)
    layout = detect_layout(sd)
    cfg = config_from_state_dict(to_original(sd))["params"]
    enc, dec = cfg["encoder_config"]["params"], cfg["decoder_config"]["params"]
    downscale = 2 ** (len(enc["ch_mult"]) - 1)
    time_mode = dec.get("time_mode")
    families = [f for f in guess_families(cfg["embed_dim"], downscale) if (f == "svd") == bool(time_mode)]
    return {"layout": layout} | _counts(sd) | {
        "latent_channels": cfg["embed_dim"],
        "downscale": downscale,
        "ch": enc["ch"],
        "ch_mult": enc["ch_mult"],
        "num_res_blocks": enc["num_res_blocks"],
        "mid_attention": enc["attn_type"] != "none",
        "quant_conv": cfg["use_quant_conv"],
        "post_quant_conv": cfg["use_post_quant_conv"],
        "decoder": cfg["decoder_config"]["target"].removeprefix("vaetool."),
        "time_mode": time_mode,
        "candidate_families": families,
    }


def _listing(what: str, items: list[str], limit: int = 3) -> str:
    more = ", ..." if len(items) > limit else ""
    return f"{len(items)} {what} ({', '.join(items[:limit])}{more})"


def load_into(model: torch.nn.Module, sd: dict[str, torch.Tensor], path: str | Path | None = None, *, assign: bool = False) -> None:
    """Strictly load `sd` into `model`: every key and shape is checked first, tensors cast to the model's dtypes.

    `assign` makes the tensors the model's own (no copy): for a model built on the meta device.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = [
        f"{k} {list(sd[k].shape)} vs model {list(expected[k].shape)}"
        for k in sorted(set(sd) & set(expected))
        if sd[k].shape != expected[k].shape
    ]
    problems = [_listing(w, items) for w, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if items]
    if problems:
        raise CheckpointError(f"checkpoint does not fit the model: {'; '.join(problems)}", path)
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in sd.items()}, strict=True, assign=assign)


@dataclass
class LoadedCheckpoint:
    """A VAE checkpoint in original layout with the config that fits it and where it came from."""

    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any]
    layout: str
    prefix: str
    has_ema: bool
    used_ema: bool
    path: Path
    metadata: dict[str, str] = field(default_factory=dict)
    latent_format: LatentFormat | None = None  # what the checkpoint's own config declares (a diffusers config.json)
    force_upcast: bool = False  # that config advises against running in fp16
    origin: dict[str, str] = field(default_factory=dict)  # where it came from beyond the file: config.json, repo, revision

    @cached_property
    def sha256(self) -> str:
        """Hex sha256 of the file on first use (cached across runs by path, size and mtime: vaetool.hashing)."""
        from vaetool.hashing import file_sha256

        return file_sha256(self.path)


def _set_norm_groups(config: dict[str, Any], value: str | None) -> None:
    """GroupNorm groups from a vaetool-trained file's metadata (shapes cannot tell them; SD's 32 otherwise)."""
    if value is None:
        return
    if not value.isdigit() or int(value) < 1:
        raise CheckpointError(f"metadata norm_groups must be a positive integer, got {value!r}")
    for coder in ("encoder_config", "decoder_config"):
        if coder not in config["params"]:
            raise CheckpointError(f"metadata norm_groups is for GroupNorm VAEs; a {config['target']} has none")
        config["params"][coder]["params"]["norm_groups"] = int(value)


def unread_keys(without: str | None = None) -> Callable[[str], bool]:
    """Keys of a checkpoint file that need not be read: all outside the VAE, and those of the coder `without` names."""

    def skip(key: str) -> bool:
        if key.startswith(EMA_PREFIX):
            return False
        for prefix in VAE_PREFIXES:
            rest = key[len(prefix):] if key.startswith(prefix) else ""
            if rest.startswith(VAE_ROOTS) and not (without is not None and rest.startswith(f"{without}.")):
                return False
        return True

    return skip


def load_checkpoint(path: str | Path, *, ema: bool = False, without: str | None = None) -> LoadedCheckpoint:
    """Read any supported VAE checkpoint file into original layout plus its model config (no model built).

    Only the VAE's tensors are read from a safetensors file; `without="encoder"` (or "decoder") leaves
    that coder's tensors unread too (meta tensors: every key and shape is still there to check).
    """
    path = Path(path)
    raw = read_state_dict(path, skip=unread_keys(without))
    try:
        found = extract_vae(raw, ema=ema)
        layout, sd, config = convert_any(found.state_dict)
        metadata = read_safetensors_metadata(path) if looks_like_safetensors(path) else {}
        _set_norm_groups(config, metadata.get("norm_groups"))
    except CheckpointError as err:
        if err.path is None:
            raise CheckpointError(err.problem, path) from None
        raise
    return LoadedCheckpoint(sd, config, layout, found.prefix, found.has_ema, found.used_ema, path, metadata)
