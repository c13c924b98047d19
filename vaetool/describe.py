"""What `vaetool info` says about configs, weights and latent files, read from their YAML and file headers.

Configs are described from the YAML alone (no model is built, no torch imported): family, latent
channels, downscale, architecture, and the shipped weights' stored dtype and parameter count from
their safetensors header. Training recipes (a `model:` that names another config, with `data:`) are
told apart from model configs. Latent files are described from their header and metadata.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from vaetool.errors import ConfigError, InputError, VaeToolError

__all__ = ["config_rows", "describe_config", "describe_latent", "is_latent_file", "weights_summary"]

# safetensors dtype names -> torch's (what `info CHECKPOINT` shows)
SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}  # fmt: skip
ARCH_KEYS = ("ch", "ch_mult", "num_res_blocks", "z_channels", "embed_dim", "dim", "dim_mult", "channels", "encoder_blocks",
             "decoder_blocks", "patch_size", "norm_groups")
PROVENANCE_KEYS = ("config", "checkpoint_sha256", "posterior", "seed", "random_weights", "vaetool_version", "source", "key")
SIZE_KEYS = ("original_size", "padded_size", "padding")


def weights_summary(path: Path) -> dict[str, Any]:
    """Tensors, parameters and stored dtypes of a .safetensors weights file, from its header only."""
    from vaetool.io.safe_header import safetensors_header

    header, meta = safetensors_header(path, InputError)
    dtypes: dict[str, int] = {}
    for entry in header.values():
        name = SAFETENSORS_DTYPES.get(entry["dtype"], entry["dtype"].lower())
        dtypes[name] = dtypes.get(name, 0) + 1
    params = sum(math.prod(entry["shape"]) for entry in header.values())
    return {"tensors": len(header), "parameters": params, "dtypes": dtypes, "weights_metadata": meta}


def _architecture(model: dict[str, Any]) -> dict[str, Any]:
    """The few architecture numbers of a VAE config (ch, ch_mult, ...), wherever the config nests them."""
    params = model.get("params") or {}
    nested = [params.get("ddconfig"), (params.get("encoder_config") or {}).get("params")]
    found: dict[str, Any] = {}
    for source in (params, *[n for n in nested if isinstance(n, dict)]):
        found |= {k: source[k] for k in ARCH_KEYS if k in source and k not in found}
    return found


def describe_config(name_or_path: str | Path, doc: dict[str, Any] | None = None) -> dict[str, Any]:
    """A config's summary from its YAML (`doc`, when already read): target, family, latent format, architecture,
    weights (no model is built)."""
    from vaetool.config import extract_vae_config, find_config_file, is_recipe, load_yaml

    path = find_config_file(name_or_path)
    doc = load_yaml(path) if doc is None else doc
    if is_recipe(doc):
        raise ConfigError(f"a training recipe (for `vaetool train {path}`), not a model config", path)
    cfg = extract_vae_config(doc, str(path))
    fmt = cfg.latent_format
    summary: dict[str, Any] = {"kind": "config", "path": cfg.source, "name": Path(cfg.source).stem, "target": cfg.model["target"]}
    summary["family"] = None if fmt is None else fmt.family
    summary["latent_channels"] = None if fmt is None or not fmt.channels else fmt.channels
    summary["downscale"] = None if fmt is None else fmt.downscale  # raw, as `info CHECKPOINT` says
    summary |= _architecture(cfg.model)
    summary["test_model"] = cfg.test_model
    summary["latent_format"] = None if fmt is None else fmt.as_dict()
    summary["checkpoint"] = None if cfg.checkpoint is None else str(cfg.checkpoint)
    summary["weights"] = _weights_state(cfg.checkpoint, cfg.test_model)
    if cfg.checkpoint is not None and cfg.checkpoint.is_file() and cfg.checkpoint.suffix.lower() == ".safetensors":
        weights = weights_summary(cfg.checkpoint)
        summary |= {k: weights[k] for k in ("tensors", "parameters", "dtypes")}
    return summary


def _weights_state(checkpoint: Path | None, test_model: bool) -> str:
    """'shipped', 'random (test model)', 'missing: PATH' or 'needs --checkpoint'."""
    if checkpoint is not None:
        return "shipped" if checkpoint.is_file() else f"missing: {checkpoint}"
    return "random (test model)" if test_model else "needs --checkpoint"


def config_rows() -> tuple[list[dict[str, Any]], list[str]]:
    """(one summary per shipped model config, the names of the shipped training recipes), by name."""
    from vaetool.config import find_config_file, is_recipe, load_yaml, shipped_configs

    rows, recipes = [], []
    for name in shipped_configs():
        try:
            path = find_config_file(name)
            doc = load_yaml(path)
            if is_recipe(doc):
                recipes.append(name)
                continue
            rows.append(describe_config(path, doc))
        except VaeToolError as err:  # one broken config is shown as such, not the end of the listing
            rows.append({"name": name, "error": str(err)})
    return rows, recipes


def is_latent_file(path: Path) -> bool:
    """Whether a file is a latent file (vaetool, ComfyUI, sd-scripts, .npy) rather than a checkpoint."""
    from vaetool.io.latent_item import FORMAT, SHARD_FORMAT
    from vaetool.io.safe_header import looks_like_safetensors, safetensors_header

    suffix = path.suffix.lower()
    if suffix in (".npy", ".npz", ".latent"):
        return True
    if suffix in (".safetensors", ".sft") or looks_like_safetensors(path):
        header, meta = safetensors_header(path, InputError)
        return meta.get("format") in (FORMAT, SHARD_FORMAT) or bool({"latent", "latent_tensor"} & set(header))
    return False


def describe_latent(path: Path) -> dict[str, Any]:
    """A latent file's summary: format, shape, stored dtype, raw/scaled, family, provenance, original size."""
    from vaetool.io.safe_header import looks_like_safetensors

    if path.suffix.lower() in (".safetensors", ".sft", ".latent") or looks_like_safetensors(path):
        return _describe_safetensors_latent(path)
    return _describe_other_latent(path)


def _form(meta: dict[str, Any]) -> str | None:
    """'raw' or 'scaled' as the metadata records it (None when it does not say)."""
    if isinstance(meta.get("scaled"), bool):
        return "scaled" if meta["scaled"] else "raw"
    word = str(meta.get("latent_format", "")).lower()
    return word if word in ("raw", "scaled") else None


def _describe_safetensors_latent(path: Path) -> dict[str, Any]:
    from vaetool.io.latent_item import COMFY_MARKER, FORMAT, SHARD_FORMAT, decode_metadata
    from vaetool.io.safe_header import safetensors_header

    header, raw_meta = safetensors_header(path, InputError)
    fmt = raw_meta.get("format")
    if fmt == SHARD_FORMAT:
        shapes = sorted({tuple(e["shape"]) for e in header.values()})
        dtypes = sorted({SAFETENSORS_DTYPES.get(e["dtype"], e["dtype"]) for e in header.values()})
        return {"kind": "latent", "path": str(path), "format": "vaetool latent shard", "latents": len(header),
                "shapes": [list(s) for s in shapes], "dtype": ", ".join(dtypes)}
    key = "latent" if "latent" in header else "latent_tensor" if "latent_tensor" in header else None
    if key is None:
        raise InputError(f"no latent tensor inside (tensors: {', '.join(sorted(header)[:5])})", path)
    meta = decode_metadata(raw_meta, path) if fmt == FORMAT else dict(raw_meta)
    entry = header[key]
    name = {FORMAT: "vaetool latent"}.get(str(fmt), "ComfyUI latent" if key == "latent_tensor" else "safetensors latent")
    summary: dict[str, Any] = {"kind": "latent", "path": str(path), "format": name, "format_version": raw_meta.get("format_version"),
                               "shape": entry["shape"], "dtype": SAFETENSORS_DTYPES.get(entry["dtype"], entry["dtype"])}
    if key == "latent_tensor":
        summary["form"] = "raw" + ("" if COMFY_MARKER in header else " (legacy file: raw x 0.18215; decode divides it back)")
    else:
        summary["form"] = _form(meta)
    summary |= {k: meta.get(k) for k in ("family", "scale", "shift", "downscale")}
    summary |= {k: meta.get(k) for k in SIZE_KEYS}
    summary["provenance"] = {k: meta[k] for k in PROVENANCE_KEYS if k in meta} or None
    known = {"scaled", "latent_format", "family", "scale", "shift", "downscale", "dtype", *SIZE_KEYS, *PROVENANCE_KEYS}
    summary["other_metadata"] = {k: v for k, v in meta.items() if k not in known} or None
    return summary


def _stored_dtype(path: Path) -> str | None:
    """The dtype an .npy/.npz file stores its (first) array in, from the array header."""
    import numpy as np

    if path.suffix.lower() == ".npy":
        return str(np.load(path, mmap_mode="r", allow_pickle=False).dtype)
    if path.suffix.lower() == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            keys = [k for k in npz.files if k.startswith("latents")] or npz.files
            return str(npz[keys[0]].dtype) if keys else None
    return None


def _describe_other_latent(path: Path) -> dict[str, Any]:
    from vaetool.io.latents import load_latents

    items = load_latents(path)  # every check of the reader (shapes, pickles, zip bombs) before any number is shown
    first = items[0]
    meta = first.metadata
    summary: dict[str, Any] = {"kind": "latent", "path": str(path), "format": meta.get("source_format"),
                               "latents": len(items), "shape": list(first.latent.shape), "dtype": _stored_dtype(path),
                               "form": _form(meta)}
    summary |= {k: v for k, v in meta.items() if k not in ("source_format", "scaled")}
    return summary
