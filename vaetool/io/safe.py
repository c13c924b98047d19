"""Reading untrusted weight and latent files safely: safetensors headers checked before any tensor
is read, and pickles only through `torch.load(weights_only=True)`.

One reader for checkpoints and latent files alike; the caller passes the error class its users
see (CheckpointError or InputError), so every failure is one line naming the file. The one writer
(write_safetensors) sorts the header, so equal tensors and metadata always give equal bytes.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch

from vaetool.errors import VaeToolError, first_line
from vaetool.io.safe_header import MAX_HEADER_BYTES, looks_like_safetensors, safetensors_header

__all__ = [
    "MAX_HEADER_BYTES", "UNSAFE_GLOBAL", "load_weights_only", "looks_like_safetensors",
    "read_safetensors", "safetensors_bytes", "safetensors_header", "write_safetensors",
]  # fmt: skip

UNSAFE_GLOBAL = re.compile(r"unsupported (?:global: )?GLOBAL (\S+)", re.IGNORECASE)  # torch's wordings vary by version
TORCH_MAGIC = b"PK\x03\x04"  # torch.save's zip container
# safetensors dtype names -> torch dtypes (the ones a checkpoint or latent may hold)
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
PICKLE_PROTOCOL = b"\x80"  # a pickle of protocol 2 or later (torch's legacy format)
_np_core = getattr(np, "_core", None) or np.core
# harmless globals a weights_only pickle may need (numpy scalars in Lightning callback state)
SAFE_GLOBALS: list[Any] = [_np_core.multiarray.scalar, np.dtype] + [
    type(np.dtype(t)) for t in ("float16", "float32", "float64", "int32", "int64", "bool")
]


def read_safetensors(
    path: Path, error: type[VaeToolError], keys: list[str] | None = None, *, skip: Callable[[str], bool] | None = None
) -> dict[str, torch.Tensor]:
    """The named tensors (all when `keys` is None) of a safetensors file whose header checks out.

    Keys for which `skip(key)` is true are not read: they come back as meta tensors of the
    header's shape and dtype (their names and shapes can be checked, their data costs nothing).
    """
    header, _ = safetensors_header(path, error)
    wanted = list(header) if keys is None else keys
    placeholders = {k: _meta_tensor(header[k], k, path, error) for k in wanted if skip is not None and k in header and skip(k)}
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: placeholders[k] if k in placeholders else f.get_tensor(k) for k in wanted}
    except Exception as err:
        raise error(f"corrupt safetensors file: {first_line(err)}", path) from None


def _meta_tensor(entry: dict[str, Any], key: str, path: Path, error: type[VaeToolError]) -> torch.Tensor:
    """A meta tensor with a header entry's shape and dtype (no data read)."""
    dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
    if dtype is None:
        raise error(f"unsupported safetensors dtype {entry['dtype']} of {key}", path)
    return torch.empty([int(n) for n in entry["shape"]], dtype=dtype, device="meta")


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """Tensors and string metadata as safetensors bytes that depend only on them.

    The library lays out the data (sorted by dtype and name) but writes its JSON header in hash
    order, which differs from run to run; the header is rewritten with sorted keys, padded with
    spaces to the 8-byte alignment the format keeps. Tensors sharing storage (views of one batch)
    are copied, as the library refuses them.
    """
    storages: set[int] = set()
    own = {}
    for key, tensor in tensors.items():  # views of one batch share storage, which the library refuses
        ptr = tensor.untyped_storage().data_ptr()
        own[key] = tensor.clone() if ptr in storages else tensor
        storages.add(ptr)
    try:
        blob = safetensors.torch.save(own, metadata=metadata)
    except safetensors.SafetensorError as err:  # not an OSError: callers would not see a failed write
        if "No space left" in str(err):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from None
        raise OSError(errno.EIO, f"safetensors could not write it: {first_line(err)}") from None
    n = int.from_bytes(blob[:8], "little")
    header = json.dumps(json.loads(blob[8 : 8 + n]), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + blob[8 + n :]


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write tensors and string metadata as a safetensors file whose bytes depend only on them (safetensors_bytes)."""
    data = safetensors_bytes(tensors, metadata)
    with open(path, "wb") as f:
        f.write(data)


def load_weights_only(path: Path, error: type[VaeToolError], what: str = "torch file", data: bytes | None = None) -> Any:
    """torch.load(weights_only=True): tensors and plain containers only; a pickle that would import code is refused.

    `data`, when given, is the file's content already read (a gunzipped cache), loaded from memory.
    """
    from vaetool.io.sniff import sniff

    if data is None:
        if (kind := sniff(path)) is not None:
            raise error(f"not a {what} ({kind})", path)
        with path.open("rb") as f:
            magic = f.read(4)
    else:
        magic = data[:4]
    if not (magic.startswith(TORCH_MAGIC) or magic[:1] == PICKLE_PROTOCOL):
        raise error(f"not a {what}: neither safetensors nor a torch zip or pickle file", path)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols before failing or not
            # a zip file is mapped, not read: tensors nobody touches (a whole model's UNet) cost no memory
            if data is not None:
                return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=magic.startswith(TORCH_MAGIC))
    except pickle.UnpicklingError as err:
        if m := UNSAFE_GLOBAL.search(str(err)):
            raise error(
                f"unsafe pickle: it would import {m[1]}; refusing to load it (only tensors and plain "
                "containers are read; convert it to .safetensors with a tool you trust)", path
            ) from None
        if detail := re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(err)):
            raise error(f"unsafe or unsupported pickle, refusing to load it: {detail[1]}", path) from None
        raise error(f"truncated or corrupt {what}: {first_line(err)}", path) from None
    except Exception as err:
        raise error(f"truncated or corrupt {what}: {first_line(err)}", path) from None
