"""Latent files: vaetool's own .safetensors (single and sharded), ComfyUI .latent, .npy, weights-only
.pt/.pth and the trainers' caches (sd-scripts .npz, musubi-tuner .safetensors, SimpleTuner .pt/.pt.gz,
OneTrainer .pt: vaetool.io.trainer_caches), all read into LatentItems [C, h, w] float32 with their metadata.
ComfyUI's 5-D latents of the video models (Wan 2.1 / Qwen-Image, [B, C, T, h, w]) are images when T = 1.

Metadata keys every loader may set (the commands read them): "scaled" (bool: the tensor is in
the diffusion model's scaled space), "source_format" (where it came from), plus whatever the
writer recorded (family, original size, ...). vaetool files store metadata values as strings,
JSON-encoding the non-strings and listing them under JSON_KEYS so they decode back exactly.

Nothing a file declares is trusted: safetensors headers are checked entry by entry (io/safe.py),
.npy/.npz headers are read first and their shapes checked against the bytes the file (or zip
member) holds before any array is allocated, and a file that is not what its suffix says is
named as such. Written files are byte-reproducible: equal tensors and metadata, equal bytes.
"""

from __future__ import annotations

import math
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from vaetool.errors import InputError, check_utf8_name, first_line
from vaetool.io.atomic import atomic_write
from vaetool.io.latent_item import (
    COMFY_LEGACY_SCALE,
    COMFY_MARKER,
    FORMAT,
    FORMAT_VERSION,
    LATENT_SUFFIXES,
    SHARD_FORMAT,
    TENSOR_KEYS,
    LatentItem,
    check_channels,
    decode_metadata,
    encode_metadata,
    listing,
    split_batch,
    validate_latent,
)
from vaetool.io.safe import load_weights_only, read_safetensors, safetensors_bytes, safetensors_header, write_safetensors
from vaetool.io.shards import load_shard, load_shard_dir
from vaetool.io.trainer_caches import PICKLE_CACHES, SAFETENSORS_CACHES, gunzip_latent, sd_scripts_items
from vaetool.limits import MAX_DEFLATE_RATIO

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "LATENT_SUFFIXES",
    "LatentItem",
    "check_channels",
    "decode_metadata",
    "encode_metadata",
    "latent_bytes",
    "load_latents",
    "save_latent",
    "tar_latents",
    "validate_latent",
]

NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a zip with members, an empty zip
NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}  # 3.0: structured only
NPZ_METHODS = {zipfile.ZIP_STORED: 1, zipfile.ZIP_DEFLATED: MAX_DEFLATE_RATIO}  # what np.savez(_compressed) write -> max expansion


def _latent_file(latent: torch.Tensor, metadata: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if latent.ndim not in (3, 4):
        raise ValueError(f"expected a latent [C, h, w] or [B, C, h, w], got {tuple(latent.shape)}")
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, **encode_metadata(metadata)}
    return {"latent": latent.detach().to("cpu").contiguous()}, header  # [C, h, w]


def save_latent(path: str | Path, latent: torch.Tensor, metadata: dict[str, Any], *, overwrite: bool = False) -> None:
    """Write a latent [C, h, w] (or a batch [B, C, h, w]) as a vaetool .safetensors file, atomically."""
    tensors, header = _latent_file(latent, metadata)
    atomic_write(path, lambda tmp: write_safetensors(tmp, tensors, header), overwrite=overwrite)


def latent_bytes(latent: torch.Tensor, metadata: dict[str, Any]) -> bytes:
    """The bytes of the vaetool .safetensors file save_latent would write (a tar member's content)."""
    return safetensors_bytes(*_latent_file(latent, metadata))


def comfy_image_latent(tensor: Any, path: Path) -> Any:
    """A ComfyUI latent as images: the video models' 5-D [B, C, T, h, w] (Wan 2.1 / Qwen-Image images are T = 1)
    loses its T axis; a video (T > 1) is an InputError naming the file; other shapes pass unchanged."""
    shape = tuple(getattr(tensor, "shape", ()))
    if len(shape) != 5:
        return tensor
    if shape[2] != 1:
        raise InputError(f"a video latent {list(shape)} ({shape[2]} latent frames): `vaetool decode` takes image latents "
                         "(1 frame): decode it with `vaetool video decode`", path)
    return tensor[:, :, 0]  # [B, C, h, w]


def _load_safetensors(path: Path) -> list[LatentItem]:
    header, meta = safetensors_header(path, InputError)
    fmt = meta.get("format")
    if fmt == SHARD_FORMAT:
        return load_shard(path)
    if "latent" in header:  # vaetool's own (or a file that names its tensor the same way)
        tensor = validate_latent(read_safetensors(path, InputError, ["latent"])["latent"], path)
        return split_batch(path, path.stem, tensor, decode_metadata(meta, path))
    if "latent_tensor" in header:  # ComfyUI SaveLatent
        tensor = comfy_image_latent(read_safetensors(path, InputError, ["latent_tensor"])["latent_tensor"], path)
        tensor = validate_latent(tensor, path)
        info: dict[str, Any] = {"source_format": "comfyui", "scaled": False}
        if COMFY_MARKER not in header:
            tensor = tensor / COMFY_LEGACY_SCALE  # legacy files hold raw * 0.18215 whatever the model
            info["converted"] = f"legacy ComfyUI latent (no {COMFY_MARKER}): divided by {COMFY_LEGACY_SCALE}"
        extra = {k: v for k, v in meta.items() if k not in info}  # prompt/workflow JSON strings
        return split_batch(path, path.stem, tensor, {**extra, **info})
    for detect, load in SAFETENSORS_CACHES:  # the trainers' caches (musubi-tuner), found by their metadata
        if detect(header, meta):
            return load(path, header, meta)
    candidates = [k for k, v in header.items() if len(v.get("shape", ())) in (3, 4)]
    if len(candidates) != 1:
        raise InputError(f"no latent tensor inside (tensors: {listing(header)})", path)
    tensor = validate_latent(read_safetensors(path, InputError, candidates)[candidates[0]], path, f"tensor {candidates[0]!r}")
    return split_batch(path, path.stem, tensor, {"source_format": "safetensors", **meta})


def _magic(path: Path, expected: tuple[bytes, ...], what: str) -> None:
    with path.open("rb") as f:
        head = f.read(max(map(len, expected)))
    if not any(head.startswith(m) for m in expected):
        raise InputError(f"not a {what} file (no {what} header): corrupt, or another format with this suffix", path)


def _check_npy_header(f: IO[bytes], available: int, path: Path, what: str) -> None:
    """Read a .npy header from f and refuse it when its shape needs more than the `available` bytes after it."""
    try:
        version = np.lib.format.read_magic(f)
        read_header = NPY_HEADERS.get(version)
        if read_header is None:
            raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
        shape, _, dtype = read_header(f)
    except OSError:
        raise
    except Exception as err:  # numpy parses the header with tokenize and literal_eval, which raise many types
        raise InputError(f"corrupt .npy header{what}: {first_line(err)}", path) from None
    if dtype.hasobject:
        raise InputError(f"holds pickled objects{what}; refusing to load them", path)
    needed = math.prod(shape) * dtype.itemsize
    if needed > available - f.tell():
        raise InputError(f"truncated or corrupt{what}: its header declares shape {list(shape)} {dtype} ({needed} bytes), "
                         f"the file holds {max(0, available - f.tell())}", path)


def _check_npz(path: Path) -> None:
    """Check every member of a .npz before numpy allocates it: a known compression, within its ratio, shapes that fit."""
    _magic(path, ZIP_MAGICS, ".npz")
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            ratio = NPZ_METHODS.get(info.compress_type)
            where = f" (member {info.filename!r})"
            if ratio is None:
                raise InputError(f"unsupported zip compression {info.compress_type}{where}; numpy writes stored or deflate", path)
            if info.file_size > max(info.compress_size, 1) * ratio:
                raise InputError(f"corrupt .npz{where}: it claims {info.file_size} bytes from {info.compress_size}, "
                                 f"more than its compression can expand (a zip bomb?)", path)
            if info.filename.endswith(".npy"):
                with zf.open(info) as f:
                    _check_npy_header(f, info.file_size, path, where)


def _load_npz(path: Path) -> list[LatentItem]:
    try:
        _check_npz(path)
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except ValueError as err:
        if "pickle" in str(err):
            raise InputError("holds pickled objects; refusing to load them", path) from None
        raise InputError(f"corrupt .npz file: {first_line(err)}", path) from None
    except (OSError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, NotImplementedError, RuntimeError) as err:
        raise InputError(f"truncated or corrupt .npz file: {first_line(err)}", path) from None  # RuntimeError: encrypted
    items = sd_scripts_items(path, arrays)
    if items is not None:
        return items
    if len(arrays) == 1:  # np.savez(path, array)
        (key, array), = arrays.items()
        return split_batch(path, path.stem, validate_latent(array, path, f"array {key!r}"), {"source_format": "npz"})
    raise InputError(f"no latent array inside (arrays: {listing(arrays)})", path)


def _load_npy(path: Path) -> list[LatentItem]:
    _magic(path, (NPY_MAGIC,), ".npy")
    try:
        with path.open("rb") as f:
            _check_npy_header(f, path.stat().st_size, path, "")
        array = np.load(path, allow_pickle=False)
    except ValueError as err:
        raise InputError(f"truncated or corrupt .npy file: {first_line(err)}", path) from None
    except (OSError, EOFError) as err:
        raise InputError(f"truncated or corrupt .npy file: {first_line(err)}", path) from None
    return split_batch(path, path.stem, validate_latent(array, path), {"source_format": "npy"})


def _load_pickle(path: Path) -> list[LatentItem]:
    data = gunzip_latent(path)  # SimpleTuner's compressed caches (.pt.gz, or gzip under a .pt name)
    obj = load_weights_only(path, InputError, data=data)
    for detect, load in PICKLE_CACHES:  # the trainers' caches (OneTrainer, SimpleTuner), found by keys and names
        if detect(obj, path, data is not None):
            return load(path, obj)
    info: dict[str, Any] = {"source_format": "torch"}
    if isinstance(obj, dict):
        key = next((k for k in TENSOR_KEYS if k in obj), None)
        if key is None:
            raise InputError(f"no latent tensor inside (keys: {listing(obj)}; expected one of "
                             f"{', '.join(TENSOR_KEYS)})", path)
        obj = obj[key]
        if key == "samples":  # ComfyUI's LATENT dict: raw latents
            info |= {"source_format": "comfyui", "scaled": False}
            obj = comfy_image_latent(obj, path)
    return split_batch(path, path.stem, validate_latent(obj, path), info)


TAR_MEMBER_SUFFIXES = (".safetensors", ".npy")  # latent members of a WebDataset tar (KEY.latent.safetensors, KEY.npy)


def tar_latents(path: Path) -> Iterator[LatentItem | tuple[str, str]]:
    """Each latent member of a WebDataset tar, read one at a time, as an item named {tar stem}/{key}; a bad one as (name, problem).

    Each member goes through the loader of its kind (every check of a latent file applies) from a private temp file.
    """
    import tempfile

    from vaetool.io.webdataset import iter_samples

    stem = path.name[: -len(".tar")] if path.name.lower().endswith(".tar") else path.stem
    with tempfile.TemporaryDirectory(prefix="vaetool-tar-") as tmp:
        try:
            yield from _tar_members(iter_samples(str(path), image_suffixes=TAR_MEMBER_SUFFIXES), stem, Path(tmp), path)
        except InputError as err:  # the tar cannot be opened at all
            yield stem, err.problem


def _tar_members(samples: Iterator[Any], stem: str, tmp: Path, path: Path) -> Iterator[LatentItem | tuple[str, str]]:
    """The items of tar samples (their latent member loaded from a temp file in `tmp`), or (name, problem)."""
    from vaetool.io.webdataset import BadSample

    for sample in samples:
        name = f"{stem}/{sample.key}"
        if isinstance(sample, BadSample):
            yield name, (f"{sample.member}: " if sample.member else "") + sample.reason
            continue
        member = tmp / ("m" + Path(sample.image_member).suffix.lower())  # m.safetensors or m.npy
        member.write_bytes(sample.image)
        try:
            items = LOADERS[member.suffix](member)
        except (InputError, OSError) as err:
            yield name, f"{sample.image_member}: {getattr(err, 'problem', None) or err}"
            continue
        finally:
            member.unlink(missing_ok=True)
        for item in items:  # "m", or "m_0", "m_1" for a batch
            yield LatentItem(name + item.name[1:], item.latent, item.metadata, path)


def _load_tar(path: Path) -> list[LatentItem]:
    items = []
    for item in tar_latents(path):
        if isinstance(item, tuple):
            raise InputError(f"member {item[0]}: {item[1]}", path)
        items.append(item)
    if not items:
        raise InputError("no latent members (KEY.latent.safetensors, KEY.npy) in this tar", path)
    return items


LOADERS: dict[str, Callable[[Path], list[LatentItem]]] = {
    ".safetensors": _load_safetensors,
    ".sft": _load_safetensors,
    ".latent": _load_safetensors,
    ".npz": _load_npz,
    ".npy": _load_npy,
    ".pt": _load_pickle,
    ".pth": _load_pickle,
    ".pt.gz": _load_pickle,
    ".tar": _load_tar,
}


def load_latents(path: str | Path) -> list[LatentItem]:
    """Every latent in a file (a batch gives several items) or in a shard folder / its index.json."""
    path = Path(path)
    check_utf8_name(path)
    if path.is_dir() or path.name.endswith("index.json"):
        return load_shard_dir(path if path.is_dir() else path.parent)
    if not path.exists():
        raise InputError("no such file", path)
    if path.stat().st_size == 0:
        raise InputError("empty file (0 bytes)", path)
    name = path.name.lower()
    loader = next((LOADERS[s] for s in sorted(LOADERS, key=len, reverse=True) if name.endswith(s) and name != s), None)
    if loader is None:
        raise InputError(f"unsupported latent file type {path.suffix!r} (expected one of {', '.join(LATENT_SUFFIXES)})", path)
    try:
        return loader(path)
    except OSError as err:
        raise InputError(f"cannot read: {err.strerror or err}", path) from None
