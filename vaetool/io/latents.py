"""Latent files: vaetool's own .safetensors (single and sharded), ComfyUI .latent, sd-scripts .npz,
.npy and weights-only .pt/.pth, all read into LatentItems [C, h, w] float32 with their metadata.

Metadata keys every loader may set (the commands read them): "scaled" (bool: the tensor is in
the diffusion model's scaled space), "source_format" (where it came from), plus whatever the
writer recorded (family, original size, ...). vaetool files store metadata values as strings,
JSON-encoding the non-strings and listing them under JSON_KEYS so they decode back exactly.
"""

from __future__ import annotations

import json
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch

from vaetool.checkpoints import UNSAFE_GLOBAL
from vaetool.errors import InputError
from vaetool.io.atomic import atomic_write

__all__ = [
    "FORMAT", "FORMAT_VERSION", "LATENT_SUFFIXES", "LatentItem", "check_channels", "decode_metadata",
    "encode_metadata", "load_latents", "read_safetensors_header", "read_tensors", "save_latent", "validate_latent",
]

LATENT_SUFFIXES: tuple[str, ...] = (".safetensors", ".latent", ".npz", ".npy", ".pt", ".pth")
FORMAT = "vaetool.latent"
FORMAT_VERSION = "1"
SHARD_FORMAT = "vaetool.shard"
RESERVED = ("format", "format_version")
JSON_KEYS = "vaetool.json_keys"  # metadata entry listing the keys whose values are JSON
COMFY_MARKER = "latent_format_version_0"
COMFY_LEGACY_SCALE = 0.18215  # ComfyUI .latent files without the marker hold raw * 0.18215
TENSOR_KEYS = ("latent", "latents", "samples", "latent_tensor")  # in .pt dicts, in this order
NPZ_LATENTS = re.compile(r"^latents(?:_(\d+)x(\d+))?$")  # sd-scripts: "latents" or "latents_{h}x{w}"


@dataclass
class LatentItem:
    """One latent [C, h, w] float32, its metadata, and the file it came from."""

    name: str
    latent: torch.Tensor
    metadata: dict[str, Any] = field(default_factory=dict)
    source: Path = Path()

    @property
    def channels(self) -> int:
        """Latent channel count C."""
        return int(self.latent.shape[0])


def encode_metadata(metadata: dict[str, Any]) -> dict[str, str]:
    """Metadata -> safetensors strings: strings as they are, everything else as JSON (keys listed)."""
    out: dict[str, str] = {}
    json_keys = []
    for key, value in metadata.items():
        if key in RESERVED or key == JSON_KEYS:
            raise ValueError(f"metadata key {key!r} is reserved")
        if isinstance(value, str):
            out[str(key)] = value
        else:
            out[str(key)] = json.dumps(value, sort_keys=True, allow_nan=False)
            json_keys.append(str(key))
    if json_keys:
        out[JSON_KEYS] = json.dumps(sorted(json_keys))
    return out


def decode_metadata(raw: dict[str, str]) -> dict[str, Any]:
    """Inverse of encode_metadata; reserved format keys are dropped, foreign strings kept as they are."""
    try:
        json_keys = set(json.loads(raw.get(JSON_KEYS, "[]")))
    except ValueError:
        json_keys = set()
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key in RESERVED or key == JSON_KEYS:
            continue
        try:
            out[key] = json.loads(value) if key in json_keys else value
        except ValueError:
            out[key] = value
    return out


def validate_latent(tensor: Any, path: Path, what: str = "latent") -> torch.Tensor:
    """A loaded array -> float32 tensor [B, C, h, w] (a [C, h, w] gets B = 1); InputError if unusable."""
    if isinstance(tensor, np.ndarray):
        if tensor.dtype.kind not in "fiu":
            raise InputError(f"{what} has dtype {tensor.dtype}, not a number array", path)
        tensor = torch.from_numpy(np.ascontiguousarray(tensor))
    if not isinstance(tensor, torch.Tensor):
        raise InputError(f"{what} is a {type(tensor).__name__}, not a tensor", path)
    if tensor.ndim not in (3, 4):
        raise InputError(f"{what} has shape {tuple(tensor.shape)}; expected [C, h, w] or [B, C, h, w]", path)
    if tensor.numel() == 0:
        raise InputError(f"{what} is empty (shape {tuple(tensor.shape)})", path)
    if tensor.is_complex() or tensor.dtype == torch.bool:
        raise InputError(f"{what} has dtype {tensor.dtype}, not real numbers", path)
    t = tensor.detach().to("cpu", torch.float32)
    t = t[None] if t.ndim == 3 else t  # [B, C, h, w]
    if not torch.isfinite(t).all():
        raise InputError(f"{what} contains {'NaN' if torch.isnan(t).any() else 'Inf'} values", path)
    return t.contiguous()


def check_channels(item: LatentItem, channels: int, model: str = "the model") -> None:
    """InputError naming the file when the latent's channel count is not what the model takes."""
    if item.channels != channels:
        raise InputError(
            f"latent {item.name!r} has {item.channels} channels but {model} takes {channels}; "
            "wrong --model/--family for this file?", item.source)


def _listing(keys: Iterable[Any], limit: int = 5) -> str:
    """A short, one-line list of names: 'a, b, c, ... (40 in all)'."""
    names = sorted(map(str, keys))
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return (", ".join(names[:limit]) + more) or "none"


def _items(path: Path, stem: str, tensor: torch.Tensor, metadata: dict[str, Any]) -> list[LatentItem]:
    """[B, C, h, w] -> B items named stem (B = 1) or stem_0, stem_1, ..."""
    if tensor.shape[0] == 1:
        return [LatentItem(stem, tensor[0], dict(metadata), path)]
    return [LatentItem(f"{stem}_{i}", t, dict(metadata), path) for i, t in enumerate(tensor)]


def save_latent(path: str | Path, latent: torch.Tensor, metadata: dict[str, Any], *, overwrite: bool = False) -> None:
    """Write a latent [C, h, w] (or a batch [B, C, h, w]) as a vaetool .safetensors file, atomically."""
    if latent.ndim not in (3, 4):
        raise ValueError(f"expected a latent [C, h, w] or [B, C, h, w], got {tuple(latent.shape)}")
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, **encode_metadata(metadata)}
    tensors = {"latent": latent.detach().to("cpu").contiguous()}  # [C, h, w]
    atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, str(tmp), metadata=header), overwrite=overwrite)


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """(tensor entries, __metadata__) of a safetensors file, checked against the file size."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n <= 0 or n > size - 8:
            raise InputError("truncated or corrupt safetensors file (bad header length)", path)
        raw = f.read(n)
    try:
        header = json.loads(raw)
        meta = header.pop("__metadata__", None) or {}
        end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise InputError("corrupt safetensors file (unreadable header)", path) from None
    if 8 + n + end > size:
        raise InputError(f"truncated safetensors file: {size} bytes, its header describes {8 + n + end}", path)
    return header, {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def read_tensors(path: Path, keys: list[str]) -> dict[str, torch.Tensor]:
    """The named tensors of a safetensors file; InputError if it cannot be read."""
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in keys}
    except Exception as err:
        raise InputError(f"corrupt safetensors file: {str(err).splitlines()[0] if str(err) else err!r}", path) from None


def _load_safetensors(path: Path) -> list[LatentItem]:
    header, meta = read_safetensors_header(path)
    fmt = meta.get("format")
    if fmt == SHARD_FORMAT:
        from vaetool.io.shards import load_shard

        return load_shard(path)
    if "latent" in header:  # vaetool's own (or a file that names its tensor the same way)
        tensor = validate_latent(read_tensors(path, ["latent"])["latent"], path)
        return _items(path, path.stem, tensor, decode_metadata(meta))
    if "latent_tensor" in header:  # ComfyUI SaveLatent
        tensor = validate_latent(read_tensors(path, ["latent_tensor"])["latent_tensor"], path)
        info: dict[str, Any] = {"source_format": "comfyui", "scaled": False}
        if COMFY_MARKER not in header:
            tensor = tensor / COMFY_LEGACY_SCALE  # legacy files hold raw * 0.18215 whatever the model
            info["converted"] = f"legacy ComfyUI latent (no {COMFY_MARKER}): divided by {COMFY_LEGACY_SCALE}"
        extra = {k: v for k, v in meta.items() if k not in info}  # prompt/workflow JSON strings
        return _items(path, path.stem, tensor, {**extra, **info})
    candidates = [k for k, v in header.items() if len(v.get("shape", ())) in (3, 4)]
    if len(candidates) != 1:
        raise InputError(f"no latent tensor inside (tensors: {_listing(header)})", path)
    tensor = validate_latent(read_tensors(path, candidates)[candidates[0]], path, f"tensor {candidates[0]!r}")
    return _items(path, path.stem, tensor, {"source_format": "safetensors", **meta})


def _load_npz(path: Path) -> list[LatentItem]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except ValueError as err:
        if "pickle" in str(err):
            raise InputError("holds pickled objects; refusing to load them", path) from None
        raise InputError(f"corrupt .npz file: {err}", path) from None
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        raise InputError(f"truncated or corrupt .npz file: {err}", path) from None
    found = sorted((k, m) for k in arrays if (m := NPZ_LATENTS.match(k)))
    if not found:
        if len(arrays) == 1:  # np.savez(path, array)
            (key, array), = arrays.items()
            return _items(path, path.stem, validate_latent(array, path, f"array {key!r}"), {"source_format": "npz"})
        raise InputError(f"no latent array inside (arrays: {_listing(arrays)})", path)
    items = []
    for key, _ in found:
        suffix = key[len("latents"):]
        meta: dict[str, Any] = {"source_format": "sd-scripts", "scaled": False}
        for extra in ("original_size", "crop_ltrb"):  # original_size is (width, height) before resizing
            if extra + suffix in arrays:
                meta[f"sd_scripts_{extra}"] = [int(v) for v in np.asarray(arrays[extra + suffix]).reshape(-1)]
        stem = path.stem if len(found) == 1 else f"{path.stem}{suffix}"
        items += _items(path, stem, validate_latent(arrays[key], path, f"array {key!r}"), meta)
    return items


def _load_npy(path: Path) -> list[LatentItem]:
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as err:
        if "pickle" in str(err):
            raise InputError("holds pickled objects; refusing to load them", path) from None
        raise InputError(f"truncated or corrupt .npy file: {err}", path) from None
    except (OSError, EOFError) as err:
        raise InputError(f"truncated or corrupt .npy file: {err}", path) from None
    return _items(path, path.stem, validate_latent(array, path), {"source_format": "npy"})


def _load_pickle(path: Path) -> list[LatentItem]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if m := UNSAFE_GLOBAL.search(str(err)):
            raise InputError(f"unsafe pickle: it would import {m[1]}; refusing to load it (only tensors and "
                             "plain containers are read)", path) from None
        raise InputError("unsafe or corrupt pickle, refusing to load it", path) from None
    except Exception as err:
        raise InputError(f"truncated or corrupt torch file: {str(err).splitlines()[0] if str(err) else err!r}", path) from None
    info: dict[str, Any] = {"source_format": "torch"}
    if isinstance(obj, dict):
        key = next((k for k in TENSOR_KEYS if k in obj), None)
        if key is None:
            raise InputError(f"no latent tensor inside (keys: {_listing(obj)}; expected one of "
                             f"{', '.join(TENSOR_KEYS)})", path)
        if key == "samples":  # ComfyUI's LATENT dict: raw latents
            info |= {"source_format": "comfyui", "scaled": False}
        obj = obj[key]
    return _items(path, path.stem, validate_latent(obj, path), info)


LOADERS: dict[str, Callable[[Path], list[LatentItem]]] = {
    ".safetensors": _load_safetensors,
    ".sft": _load_safetensors,
    ".latent": _load_safetensors,
    ".npz": _load_npz,
    ".npy": _load_npy,
    ".pt": _load_pickle,
    ".pth": _load_pickle,
}


def load_latents(path: str | Path) -> list[LatentItem]:
    """Every latent in a file (a batch gives several items) or in a shard folder / its index.json."""
    path = Path(path)
    if path.is_dir() or path.name.endswith("index.json"):
        from vaetool.io.shards import load_shard_dir

        return load_shard_dir(path if path.is_dir() else path.parent)
    if not path.exists():
        raise InputError("no such file", path)
    if path.stat().st_size == 0:
        raise InputError("empty file (0 bytes)", path)
    loader = LOADERS.get(path.suffix.lower())
    if loader is None:
        raise InputError(f"unsupported latent file type {path.suffix!r} (expected one of {', '.join(LATENT_SUFFIXES)})", path)
    try:
        return loader(path)
    except OSError as err:
        raise InputError(f"cannot read: {err.strerror or err}", path) from None
