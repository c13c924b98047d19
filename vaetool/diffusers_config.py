"""diffusers model folders: which files hold the VAE, what its config.json says, and whether the weights agree.

A diffusers VAE is a folder with config.json and diffusion_pytorch_model.safetensors (or a
weights-only .bin, or the .fp16 variants); a whole pipeline keeps it in vae/. vaetool honours
config.json the way diffusers reads it (a key the class does not take is ignored, a missing one
takes the class default): the architecture is checked against the weights (a mismatch is named),
norm_num_groups sets the GroupNorm groups (shapes cannot tell them), scaling_factor, shift_factor
and latents_mean/latents_std become the latent format (a known family when the numbers are one's),
and force_upcast is kept as advice for half precision. No model is built here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vaetool.errors import CheckpointError, ConfigError
from vaetool.families import FAMILIES, LatentFormat

__all__ = [
    "CLASSES", "CONFIG_NAME", "PIPELINE_INDEX", "VAE_SUBFOLDER", "WEIGHT_NAMES", "DiffusersConfig", "check_weights",
    "find_config", "find_weights", "folder_files", "folder_of", "join", "latent_format", "pick_files", "read_config",
]  # fmt: skip

CONFIG_NAME = "config.json"
PIPELINE_INDEX = "model_index.json"  # the root of a whole-pipeline folder
VAE_SUBFOLDER = "vae"  # where a pipeline keeps its VAE
# in order of preference: full precision before the fp16 variant, safetensors before a weights-only pickle
WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.fp16.bin",
)
SHARD_INDEX_SUFFIX = ".index.json"
DOWN_BLOCK, UP_BLOCK = "DownEncoderBlock2D", "UpDecoderBlock2D"

# class name -> the config keys that class takes, with its defaults; "_fixed": what the class always is
_SHARED: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "down_block_types": [DOWN_BLOCK], "block_out_channels": [64], "layers_per_block": 1,
    "latent_channels": 4, "scaling_factor": 0.18215, "force_upcast": True,
}  # fmt: skip
CLASSES: dict[str, dict[str, Any]] = {
    "AutoencoderKL": _SHARED | {
        "up_block_types": [UP_BLOCK], "act_fn": "silu", "norm_num_groups": 32, "shift_factor": None, "latents_mean": None,
        "latents_std": None, "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
        "_fixed": {"temporal": False},
    },
    "AutoencoderKLTemporalDecoder": _SHARED | {
        "_fixed": {"temporal": True, "up_block_types": None, "act_fn": "silu", "norm_num_groups": 32, "shift_factor": None,
                   "latents_mean": None, "latents_std": None, "use_quant_conv": True, "use_post_quant_conv": False,
                   "mid_block_add_attention": True},
    },
}  # fmt: skip
FACTOR_TOLERANCE = 1e-6  # relative: config.json factors are the published decimals


@dataclass(frozen=True)
class DiffusersConfig:
    """What a diffusers VAE config.json says, with the class defaults filled in."""

    path: Path
    class_name: str
    temporal: bool
    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    latent_channels: int
    norm_num_groups: int
    use_quant_conv: bool
    use_post_quant_conv: bool
    mid_block_add_attention: bool
    scaling_factor: float
    shift_factor: float | None
    latents_mean: tuple[float, ...] | None
    latents_std: tuple[float, ...] | None
    force_upcast: bool

    @property
    def downscale(self) -> int:
        """Spatial factor between image and latent."""
        return 2 ** (len(self.block_out_channels) - 1)


def join(folder: str, name: str) -> str:
    """`folder/name` as a relative posix path ("" is the root)."""
    return f"{folder}/{name}" if folder else name


def folder_of(name: str) -> str:
    """The folder part of a relative posix name ("" at the root)."""
    return name.rpartition("/")[0]


def folder_files(folder: Path, subfolder: str | None) -> set[str]:
    """Relative posix names of the files a VAE could be made of in `folder`: at its root, in vae/ and in `subfolder`."""
    folders = {"", VAE_SUBFOLDER} | ({subfolder.strip("/")} if subfolder else set())
    return {join(f, p.name) for f in folders if (folder / f).is_dir() for p in (folder / f).iterdir() if p.is_file()}


def find_config(names: Collection[str], subfolder: str | None, where: str | Path) -> str:
    """The VAE's config.json among the relative posix `names` of a folder or repo.

    It is in `subfolder` when one is given, else at the root when there is one, else in vae/.
    """
    folders = [subfolder.strip("/")] if subfolder else ["", VAE_SUBFOLDER]
    found = next((join(f, CONFIG_NAME) for f in folders if join(f, CONFIG_NAME) in names), None)
    if found is not None:
        return found
    if subfolder:
        raise CheckpointError(f"no {join(folders[0], CONFIG_NAME)} (the --subfolder given)", where)
    what = "a pipeline folder without vae/config.json" if PIPELINE_INDEX in names else "not a diffusers model folder"
    raise CheckpointError(f"{what}: no config.json (nor vae/config.json) with the VAE's weights; --subfolder picks another", where)


def find_weights(names: Collection[str], config_name: str, where: str | Path) -> str:
    """The weights file beside `config_name`: full precision before the fp16 variant, safetensors before .bin."""
    folder = folder_of(config_name)
    found = next((join(folder, w) for w in WEIGHT_NAMES if join(folder, w) in names), None)
    if found is not None:
        return found
    stem = join(folder, "diffusion_pytorch_model")
    if sharded := sorted(n for n in names if n.startswith(stem) and n.endswith(SHARD_INDEX_SUFFIX)):
        raise CheckpointError(f"sharded weights ({sharded[0]}) are not supported; merge them into one file", where)
    raise CheckpointError(f"no weights next to {config_name}: expected {' or '.join(WEIGHT_NAMES)}", where)


def pick_files(names: Collection[str], subfolder: str | None, where: str | Path) -> tuple[str, str]:
    """(config.json, weights file) of the VAE among the relative posix `names` of a folder or repo."""
    config_name = find_config(names, subfolder, where)
    return config_name, find_weights(names, config_name, where)


# ---------------------------------------------------------------- reading config.json


def _positive_int(value: Any, key: str, path: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}", path)
    return value


def _flag(value: Any, key: str, path: Path) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}", path)
    return value


def _number(value: Any, key: str, path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key} must be a number, got {value!r}", path)
    return float(value)


def _upcast(value: Any, path: Path) -> bool:
    """force_upcast: true/false (the temporal class types it float, so a number counts as its truth)."""
    if isinstance(value, bool) or (isinstance(value, (int, float)) and math.isfinite(value)):
        return bool(value)
    raise ConfigError(f"force_upcast must be true or false, got {value!r}", path)


def _list(value: Any, key: str, path: Path, item: Callable[[Any, str, Path], Any]) -> tuple[Any, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{key} must be a non-empty list, got {value!r}", path)
    return tuple(item(v, key, path) for v in value)


def _block_types(raw: dict[str, Any], key: str, expected: str, levels: int, path: Path) -> None:
    types = raw[key]
    if not isinstance(types, list) or len(types) != levels:
        raise ConfigError(f"{key} must list one block per entry of block_out_channels ({levels}), got {types!r}", path)
    if other := sorted({t for t in types if t != expected}, key=str):
        raise ConfigError(f"{key}: {', '.join(map(str, other))} is not supported (only {expected})", path)


def read_config(path: Path) -> DiffusersConfig:
    """Parse a diffusers VAE config.json; ConfigError naming the file for anything unreadable or unsupported."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("no such file", path) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read: {err}", path) from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"malformed config.json: {err}", path) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"malformed config.json: a JSON object expected, got {type(raw).__name__}", path)
    class_name = raw.get("_class_name", "AutoencoderKL")
    if class_name not in CLASSES:
        raise ConfigError(f"describes a {class_name}, not a VAE vaetool loads ({', '.join(CLASSES)})", path)
    spec = dict(CLASSES[class_name])
    fixed = spec.pop("_fixed")
    values = {key: raw.get(key, default) for key, default in spec.items()} | fixed  # keys the class does not take are ignored
    widths = _list(values["block_out_channels"], "block_out_channels", path, _positive_int)
    _block_types(values, "down_block_types", DOWN_BLOCK, len(widths), path)
    if values["up_block_types"] is not None:
        _block_types(values, "up_block_types", UP_BLOCK, len(widths), path)
    if values["act_fn"] != "silu":
        raise ConfigError(f"act_fn {values['act_fn']!r} is not supported (only silu)", path)
    groups = _positive_int(values["norm_num_groups"], "norm_num_groups", path)
    if any(w % groups for w in widths):
        raise ConfigError(f"norm_num_groups {groups} does not divide block_out_channels {list(widths)}", path)
    optional = {k: values[k] for k in ("shift_factor", "latents_mean", "latents_std")}
    return DiffusersConfig(
        path=path,
        class_name=class_name,
        temporal=fixed["temporal"],
        in_channels=_positive_int(values["in_channels"], "in_channels", path),
        out_channels=_positive_int(values["out_channels"], "out_channels", path),
        block_out_channels=widths,
        layers_per_block=_positive_int(values["layers_per_block"], "layers_per_block", path),
        latent_channels=_positive_int(values["latent_channels"], "latent_channels", path),
        norm_num_groups=groups,
        use_quant_conv=_flag(values["use_quant_conv"], "use_quant_conv", path),
        use_post_quant_conv=_flag(values["use_post_quant_conv"], "use_post_quant_conv", path),
        mid_block_add_attention=_flag(values["mid_block_add_attention"], "mid_block_add_attention", path),
        scaling_factor=_number(values["scaling_factor"], "scaling_factor", path),
        shift_factor=None if optional["shift_factor"] is None else _number(optional["shift_factor"], "shift_factor", path),
        latents_mean=None if optional["latents_mean"] is None else _list(optional["latents_mean"], "latents_mean", path, _number),
        latents_std=None if optional["latents_std"] is None else _list(optional["latents_std"], "latents_std", path, _number),
        force_upcast=_upcast(values["force_upcast"], path),
    )


# ---------------------------------------------------------------- the latent format


def _per_channel_format(cfg: DiffusersConfig) -> LatentFormat:
    """latents_mean/latents_std: scaled = (raw - mean) * scaling_factor / std, channel by channel (as diffusers' pipelines)."""
    mean, std = cfg.latents_mean, cfg.latents_std
    if mean is None or std is None:
        given, missing = ("latents_mean", "latents_std") if std is None else ("latents_std", "latents_mean")
        raise ConfigError(f"gives {given} without {missing}", cfg.path)
    for key, values in (("latents_mean", mean), ("latents_std", std)):
        if len(values) != cfg.latent_channels:
            raise ConfigError(f"{key} has {len(values)} values for latent_channels {cfg.latent_channels}", cfg.path)
    if any(s <= 0 for s in std):
        raise ConfigError(f"latents_std must be positive, got {list(std)}", cfg.path)
    if cfg.shift_factor:
        raise ConfigError("gives both shift_factor and latents_mean; which shift applies is ambiguous", cfg.path)
    return LatentFormat("custom", cfg.latent_channels, cfg.scaling_factor, 0.0, cfg.downscale, mean=tuple(mean), std=tuple(std))


def latent_format(cfg: DiffusersConfig) -> LatentFormat:
    """The latent format config.json declares: a known family when its numbers are one's, else a custom one.

    sd1 and sd2 share one VAE and one format; such a folder is recorded as sd1 (--family sd2 renames it).
    """
    if cfg.scaling_factor <= 0:  # 0 would turn every scaled latent into zeros; a negative one flips them
        raise ConfigError(f"scaling_factor must be a number > 0, got {cfg.scaling_factor!r}", cfg.path)
    if cfg.latents_mean is not None or cfg.latents_std is not None:
        return _per_channel_format(cfg)
    shift = cfg.shift_factor or 0.0
    for fmt in FAMILIES.values():
        if (
            (fmt.family == "svd") == cfg.temporal
            and (fmt.channels, fmt.downscale) == (cfg.latent_channels, cfg.downscale)
            and math.isclose(float(fmt.scale), cfg.scaling_factor, rel_tol=FACTOR_TOLERANCE)
            and math.isclose(float(fmt.shift), shift, rel_tol=FACTOR_TOLERANCE, abs_tol=1e-12)
        ):
            return fmt
    return LatentFormat("custom", cfg.latent_channels, cfg.scaling_factor, shift, cfg.downscale)


# ---------------------------------------------------------------- config.json against the weights


def _from_weights(model_config: dict[str, Any]) -> dict[str, Any]:
    """What the weights (through the vaetool config fitted to them) say, in config.json's terms."""
    params = model_config["params"]
    enc, dec = params["encoder_config"]["params"], params["decoder_config"]["params"]
    return {
        "in_channels": enc["in_channels"],
        "out_channels": dec["out_ch"],
        "block_out_channels": [enc["ch"] * m for m in enc["ch_mult"]],
        "layers_per_block": enc["num_res_blocks"],
        "latent_channels": params["embed_dim"],
        "use_quant_conv": params["use_quant_conv"],
        "use_post_quant_conv": params["use_post_quant_conv"],
        "mid_block_add_attention": enc["attn_type"] != "none",
        "the decoder": "temporal" if dec.get("time_mode") else "image",
        "the temporal layers": dec.get("time_mode"),
        "attention inside the down/up blocks": bool(enc["attn_resolutions"] or dec["attn_resolutions"]),
        "z_channels": enc["z_channels"],
    }


def _from_config(cfg: DiffusersConfig) -> dict[str, Any]:
    """The same quantities as config.json gives them."""
    return {
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "block_out_channels": list(cfg.block_out_channels),
        "layers_per_block": cfg.layers_per_block,
        "latent_channels": cfg.latent_channels,
        "use_quant_conv": cfg.use_quant_conv,
        "use_post_quant_conv": cfg.use_post_quant_conv,
        "mid_block_add_attention": cfg.mid_block_add_attention,
        "the decoder": "temporal" if cfg.temporal else "image",
        "the temporal layers": "conv-only" if cfg.temporal else None,  # diffusers' TemporalDecoder
        "attention inside the down/up blocks": False,  # DownEncoderBlock2D / UpDecoderBlock2D have none
        "z_channels": cfg.latent_channels,
    }


def check_weights(cfg: DiffusersConfig, model_config: dict[str, Any], weights: Path) -> None:
    """CheckpointError naming every quantity on which config.json and the weights disagree (and the groups metadata)."""
    said, found = _from_config(cfg), _from_weights(model_config)
    wrong = [f"{key} is {said[key]} in {CONFIG_NAME} but {found[key]} in the weights" for key in said if said[key] != found[key]]
    groups = model_config["params"]["encoder_config"]["params"].get("norm_groups")
    if groups is not None and groups != cfg.norm_num_groups:
        wrong.append(f"norm_num_groups is {cfg.norm_num_groups} in {CONFIG_NAME} but {groups} in the weights' metadata")
    if wrong:
        raise CheckpointError(f"{CONFIG_NAME} ({cfg.class_name}) does not match {weights.name}: {'; '.join(wrong)}", cfg.path.parent)
