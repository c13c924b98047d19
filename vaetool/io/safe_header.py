"""The header of a safetensors file, read and checked without torch or numpy (for `vaetool info` and the
latent readers alike): every tensor entry's dtype, shape and offsets checked against the file size."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vaetool.errors import VaeToolError, check_utf8_name, first_line
from vaetool.limits import MAX_SAFETENSORS_HEADER

__all__ = ["MAX_HEADER_BYTES", "looks_like_safetensors", "safetensors_header"]

MAX_HEADER_BYTES = MAX_SAFETENSORS_HEADER


def looks_like_safetensors(path: Path) -> bool:
    """Whether the file starts like a safetensors file (a plausible header length, then '{')."""
    with path.open("rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def _entry_end(name: str, entry: Any) -> int:
    """The end offset of one tensor entry; ValueError when the entry is malformed."""
    if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str):
        raise ValueError(f"tensor {name!r} has no dtype")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"tensor {name!r} has a bad shape")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) and o >= 0 for o in offsets)):
        raise ValueError(f"tensor {name!r} has bad data offsets")
    if offsets[1] < offsets[0]:
        raise ValueError(f"tensor {name!r} ends before it starts")
    return offsets[1]


def safetensors_header(path: Path, error: type[VaeToolError]) -> tuple[dict[str, Any], dict[str, str]]:
    """(tensor entries, __metadata__ strings) of a safetensors file, every entry checked against the file size."""
    check_utf8_name(path, error)  # the safetensors library takes only UTF-8 paths
    size = path.stat().st_size
    if size == 0:
        raise error("empty file (0 bytes)", path)
    with path.open("rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n <= 0 or n > size - 8:
            raise error(f"truncated or corrupt safetensors file: its header needs {n} bytes, the file has {size}", path)
        if n > MAX_HEADER_BYTES:
            raise error(f"corrupt safetensors file: a {n}-byte header is over the {MAX_HEADER_BYTES}-byte limit", path)
        raw = f.read(n)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise ValueError("__metadata__ is not a mapping of strings")
        end = max((_entry_end(k, v) for k, v in header.items()), default=0)
    except (ValueError, TypeError, RecursionError) as err:
        raise error(f"corrupt safetensors file: unreadable header ({first_line(err, 80)})", path) from None
    if 8 + n + end > size:
        raise error(f"truncated safetensors file: {size} bytes, its header describes {8 + n + end}", path)
    return header, {str(k): v for k, v in meta.items()}
