"""One latent and its metadata (LatentItem), the metadata codec of vaetool's latent files, and the
checks every loaded latent passes (shape, dtype, finite values).

Shared by the latent-file readers (vaetool.io.latents) and the shard reader/writer (vaetool.io.shards).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vaetool.errors import InputError

__all__ = [
    "FORMAT", "FORMAT_VERSION", "JSON_KEYS", "LATENT_SUFFIXES", "SHARD_FORMAT", "LatentItem", "check_channels",
    "decode_metadata", "encode_metadata", "listing", "split_batch", "validate_latent",
]

LATENT_SUFFIXES: tuple[str, ...] = (".safetensors", ".latent", ".npz", ".npy", ".pt", ".pth", ".pt.gz", ".tar")  # .tar: WebDataset
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


def decode_metadata(raw: dict[str, str], path: Path | None = None) -> dict[str, Any]:
    """Inverse of encode_metadata; reserved format keys are dropped, keys not listed as JSON kept as strings.

    A JSON_KEYS entry that is not a JSON list of names, or a listed value that is not JSON, is an
    InputError naming the file (the metadata was not written by vaetool, or was damaged).
    """
    try:
        listed = json.loads(raw.get(JSON_KEYS, "[]"))
    except ValueError:
        listed = None
    if not isinstance(listed, list) or not all(isinstance(k, str) for k in listed):
        raise InputError(f"corrupt metadata: {JSON_KEYS} is not a JSON list of key names", path)
    json_keys = set(listed)
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key in RESERVED or key == JSON_KEYS:
            continue
        if key not in json_keys:
            out[key] = value
            continue
        try:
            out[key] = json.loads(value)
        except (ValueError, RecursionError):
            raise InputError(f"corrupt metadata: {key!r} is listed in {JSON_KEYS} but is not JSON", path) from None
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


def listing(keys: Iterable[Any], limit: int = 5) -> str:
    """A short, one-line list of names: 'a, b, c, ... (40 in all)'."""
    names = sorted(map(str, keys))
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return (", ".join(names[:limit]) + more) or "none"


def split_batch(path: Path, stem: str, tensor: torch.Tensor, metadata: dict[str, Any]) -> list[LatentItem]:
    """[B, C, h, w] -> B items named stem (B = 1) or stem_0, stem_1, ..."""
    if tensor.shape[0] == 1:
        return [LatentItem(stem, tensor[0], dict(metadata), path)]
    return [LatentItem(f"{stem}_{i}", t, dict(metadata), path) for i, t in enumerate(tensor)]
