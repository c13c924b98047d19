"""The trainers' own latent caches: sd-scripts .npz, musubi-tuner .safetensors, SimpleTuner .pt / .pt.gz
and OneTrainer .pt, read into LatentItems with what each format says about its latents' form.

Each format is found by its keys or metadata (tables below), never by trusting a suffix alone.
What a format records, and what it does not, goes into the items' metadata for the decode job:

- "source_format": the trainer; "scaled": True/False when the format fixes the form;
- "trainer_families": the model families the file can hold ([] = not recorded, any);
- "scaled_families": when the form depends on the family (sd-scripts multi-resolution caches
  without an architecture in their name), the families whose latents are stored scaled.

`settle_form` turns that into a family and a form once the user's --family and the model's family
are known, or fails the file with one line saying what to pass. The trainers resize and crop
images to their buckets (no padding), so the original sizes they record are kept as information
(`sd_scripts_original_size`, `musubi_original_size`, ...) and never used to crop the decoded image.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vaetool.errors import InputError
from vaetool.io.latent_item import NPZ_LATENTS, LatentItem, listing, split_batch, validate_latent
from vaetool.limits import MAX_GZIP_LATENT

__all__ = [
    "MUSUBI_ARCHITECTURES", "PICKLE_CACHES", "SAFETENSORS_CACHES", "SD_SCRIPTS_ARCHITECTURES", "gunzip_latent",
    "latent_stem", "sd_scripts_items", "settle_form",
]  # fmt: skip

GZIP_MAGIC = b"\x1f\x8b"
GZIP_CHUNK = 2**20  # compressed bytes read at a time
MULTI_SUFFIXES = (".pt.gz",)  # suffixes of two parts; the rest are path.suffix
SD_SCRIPTS_NAME = re.compile(r"_(\d{4,})x(\d{4,})_([A-Za-z0-9]+)$")  # {stem}_{W:04d}x{H:04d}_{arch}.npz
MUSUBI_LATENTS = re.compile(r"^latents_(\d+)x(\d+)x(\d+)_([A-Za-z0-9]+)$")  # latents_{F}x{H}x{W}_{dtype}
TRAINER_NAMES = {"simpletuner": "SimpleTuner", "onetrainer": "OneTrainer"}  # source_format -> how messages spell it
SHA256_NAME = re.compile(r"^[0-9a-f]{64}$")  # SimpleTuner names its cache files by sha256 of the image's name


# sd-scripts: the architecture at the end of the file name -> (families, stored scaled?). SD, SDXL and
# SD3 cache the VAE's raw samples; Flux and Lumina (which uses the Flux AE) cache scale * (z - shift).
# "sd" caches are SD 1.x or 2.x, whose latents are alike raw (the model's family picks between them).
SD_SCRIPTS_ARCHITECTURES: dict[str, tuple[tuple[str, ...], bool]] = {
    "sd": (("sd1", "sd2"), False),
    "sdxl": (("sdxl",), False),
    "sd3": (("sd3",), False),
    "flux": (("flux",), True),
    "lumina": (("flux",), True),
}
# multi-resolution keys (latents_{h}x{w}) in a file whose name gives no architecture: SD3 (raw) or Flux (scaled)
SD_SCRIPTS_MULTI = (("sd3", "flux"), ("flux",))

# musubi-tuner: metadata "architecture" -> the family of its latents (all stored scaled: Wan and
# Qwen-Image normalized by the VAE's per-channel mean/std, FLUX.1 Kontext by the Flux AE's scale/shift)
MUSUBI_ARCHITECTURES: dict[str, str] = {
    "wan": "wan",
    "qwen_image": "qwen-image",
    "qwen_image_edit": "qwen-image",
    "flux_kontext": "flux",
}


def latent_stem(path: Path) -> str:
    """The file name without its latent suffix ("x.pt.gz" -> "x", "x.npz" -> "x")."""
    lower = path.name.lower()
    for suffix in MULTI_SUFFIXES:
        if lower.endswith(suffix) and len(lower) > len(suffix):
            return path.name[: -len(suffix)]
    return path.stem


def _form(trainer: str, families: tuple[str, ...], scaled: bool | None, scaled_families: tuple[str, ...] = ()) -> dict[str, Any]:
    meta: dict[str, Any] = {"source_format": trainer, "trainer_families": list(families)}
    if scaled is None:
        meta["scaled_families"] = list(scaled_families)
    else:
        meta["scaled"] = scaled
    return meta


# --- sd-scripts ---------------------------------------------------------------------------------


def sd_scripts_items(path: Path, arrays: dict[str, Any]) -> list[LatentItem] | None:
    """Items of an sd-scripts .npz (keys latents[_{h}x{w}]); None when no key is one of its latents."""
    found = sorted((k, m) for k in arrays if (m := NPZ_LATENTS.match(k)))
    if not found:
        return None
    named = SD_SCRIPTS_NAME.search(path.stem)
    multi = any(m[1] is not None for _, m in found)
    if named is not None:
        arch = named[3].lower()
        if arch not in SD_SCRIPTS_ARCHITECTURES:
            raise InputError(f"an sd-scripts cache for {arch!r}, whose latent form vaetool does not know "
                             f"(known: {', '.join(SD_SCRIPTS_ARCHITECTURES)})", path)
        families, scaled = SD_SCRIPTS_ARCHITECTURES[arch]
        form = _form("sd-scripts", families, scaled)
    elif multi:  # SD3 and Flux caches both key by latent size; only the family tells them apart
        form = _form("sd-scripts", SD_SCRIPTS_MULTI[0], None, SD_SCRIPTS_MULTI[1])
    else:  # sd-scripts' old SD/SDXL caches ({stem}.npz): raw samples
        form = {"source_format": "sd-scripts", "scaled": False}
    items = []
    for key, _ in found:
        suffix = key[len("latents"):]
        meta = dict(form)
        for extra in ("original_size", "crop_ltrb"):  # original_size is (width, height) before resizing to the bucket
            if extra + suffix in arrays:
                meta[f"sd_scripts_{extra}"] = _int_list(arrays[extra + suffix], path, extra + suffix)
        stem = path.stem if len(found) == 1 else f"{path.stem}{suffix}"
        items += split_batch(path, stem, validate_latent(arrays[key], path, f"array {key!r}"), meta)
    return items


def _int_list(array: Any, path: Path, key: str) -> list[int]:
    """A small integer array of an sd-scripts cache (original_size, crop_ltrb) as a list."""
    a = np.asarray(array)
    if a.dtype.kind not in "iuf" or a.size > 8 or not np.isfinite(a).all():
        raise InputError(f"array {key!r} is not a few integers (dtype {a.dtype}, {a.size} values)", path)
    return [int(v) for v in a.reshape(-1)]


# --- musubi-tuner -------------------------------------------------------------------------------


def _is_musubi(header: dict[str, Any], meta: dict[str, str]) -> bool:
    """Metadata architecture + format_version, and a latents_FxHxW_dtype tensor (or a text-encoder cache's caption1)."""
    musubi_like = any(MUSUBI_LATENTS.match(k) for k in header) or "caption1" in meta
    return "architecture" in meta and "format_version" in meta and musubi_like


def _load_musubi(path: Path, header: dict[str, Any], meta: dict[str, str]) -> list[LatentItem]:
    from vaetool.io.safe import read_safetensors

    arch = meta["architecture"]
    keys = sorted(k for k in header if MUSUBI_LATENTS.match(k))
    if not keys:
        raise InputError(f"a musubi-tuner {arch} cache with no latents_FxHxW_dtype tensor (tensors: {listing(header)}; "
                         "a text-encoder cache?)", path)
    family = MUSUBI_ARCHITECTURES.get(arch)
    if family is None:
        raise InputError(f"a musubi-tuner cache for architecture {arch!r}, whose VAE vaetool does not have "
                         f"(known: {', '.join(MUSUBI_ARCHITECTURES)})", path)
    form = _form("musubi-tuner", (family,), True)
    size = [meta.get("width", ""), meta.get("height", "")]
    if all(v.isdigit() for v in size):
        form["musubi_original_size"] = [int(v) for v in size]  # (width, height) before resizing to the bucket
    tensors = read_safetensors(path, InputError, keys)
    items = []
    for key in keys:
        frames, h, w = (int(v) for v in MUSUBI_LATENTS.match(key).groups()[:3])  # type: ignore[union-attr]
        image = _single_frame(tensors[key], frames, (h, w), path, f"tensor {key!r}")
        stem = path.stem if len(keys) == 1 else f"{path.stem}_{frames}x{h}x{w}"
        items += split_batch(path, stem, validate_latent(image, path, f"tensor {key!r}"), form)
    return items


def _single_frame(t: Any, frames: int, hw: tuple[int, int] | None, path: Path, what: str) -> Any:
    """A [C, H, W] or [C, 1, H, W] latent as [C, H, W]; a video latent (F > 1) is an InputError."""
    if not isinstance(t, torch.Tensor) or t.ndim not in (3, 4):
        return t  # validate_latent names the problem
    shape = (frames, *hw) if hw is not None else None
    if t.ndim == 4 and shape is not None and tuple(t.shape[1:]) != shape:
        raise InputError(f"{what} has shape {tuple(t.shape)}, not the [C, {shape[0]}, {shape[1]}, {shape[2]}] its key names", path)
    if t.ndim == 3 and hw is not None and (frames != 1 or tuple(t.shape[1:]) != hw):
        raise InputError(f"{what} has shape {tuple(t.shape)}, not the [C, {frames}, {hw[0]}, {hw[1]}] its key names", path)
    if t.ndim == 4 and t.shape[1] != 1:
        raise InputError(f"{what} is a {t.shape[1]}-frame video latent [C, F, H, W]; vaetool decode writes images from "
                         "1-frame latents (vaetool video decode reads only vaetool's own video latents)", path)
    return t[:, 0] if t.ndim == 4 else t


# table: (detect(header, metadata), load(path, header, metadata)); vaetool's own and ComfyUI's are checked first
SAFETENSORS_CACHES: tuple[tuple[Callable[[dict[str, Any], dict[str, str]], bool],
                                Callable[[Path, dict[str, Any], dict[str, str]], list[LatentItem]]], ...] = (
    (_is_musubi, _load_musubi),
)


# --- SimpleTuner and OneTrainer pickles ---------------------------------------------------------


def gunzip_latent(path: Path) -> bytes | None:
    """The gunzipped content of a gzip file (SimpleTuner's compressed cache), None when it is not gzip.

    The file is read and inflated in chunks that stop at MAX_GZIP_LATENT bytes: a gzip bomb is
    refused, not inflated; a stream that does not end, or data after it, is a corrupt file.
    """
    inflater = zlib.decompressobj(wbits=31)  # gzip framing
    out = bytearray()
    with path.open("rb") as f:
        if f.read(2) != GZIP_MAGIC:
            return None
        f.seek(0)
        try:
            while not inflater.eof:
                chunk = inflater.unconsumed_tail or f.read(GZIP_CHUNK)
                if not chunk:
                    raise InputError(f"truncated gzip data: the stream ends after {len(out)} bytes without its end marker", path)
                out += inflater.decompress(chunk, MAX_GZIP_LATENT + 1 - len(out))
                if len(out) > MAX_GZIP_LATENT:
                    raise InputError(f"gzip content expands past {MAX_GZIP_LATENT} bytes (a gzip bomb?); refusing it", path)
        except zlib.error as err:
            raise InputError(f"corrupt gzip data: {err}", path) from None
        if inflater.unused_data or f.read(1):
            raise InputError("corrupt gzip file: data after the end of its stream", path)
    return bytes(out)


def _is_onetrainer(obj: Any, path: Path, gzipped: bool) -> bool:
    return isinstance(obj, dict) and "latent_image" in obj


def _load_onetrainer(path: Path, obj: Any) -> list[LatentItem]:
    """OneTrainer's cache: a dict whose latent_image is the posterior mean (raw) [C, h, w]."""
    meta = _form("onetrainer", (), False)
    for key in ("original_resolution", "crop_resolution", "crop_offset"):  # (height, width) pairs, information only
        value = obj.get(key)
        if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
            meta[f"onetrainer_{key}"] = [int(v) for v in value]
        elif isinstance(value, torch.Tensor) and value.numel() == 2 and not value.is_floating_point():
            meta[f"onetrainer_{key}"] = [int(v) for v in value.reshape(-1).tolist()]
    image = _single_frame(obj["latent_image"], 1, None, path, "latent_image")
    return split_batch(path, latent_stem(path), validate_latent(image, path, "latent_image"), meta)


def _is_simpletuner(obj: Any, path: Path, gzipped: bool) -> bool:
    return gzipped or bool(SHA256_NAME.match(latent_stem(path)))


def _load_simpletuner(path: Path, obj: Any) -> list[LatentItem]:
    """SimpleTuner's cache: a tensor (or {"latents": tensor, ...}) scaled with the model's scale/shift."""
    if isinstance(obj, dict):
        if "latents" not in obj:
            raise InputError(f"a SimpleTuner cache dict without 'latents' (keys: {listing(obj)})", path)
        obj = obj["latents"]
    image = _single_frame(obj, 1, None, path, "latents")
    return split_batch(path, latent_stem(path), validate_latent(image, path, "latents"), _form("simpletuner", (), True))


# table: (detect(object, path, gzipped), load(path, object)); the first that matches reads the file
PICKLE_CACHES: tuple[tuple[Callable[[Any, Path, bool], bool], Callable[[Path, Any], list[LatentItem]]], ...] = (
    (_is_onetrainer, _load_onetrainer),
    (_is_simpletuner, _load_simpletuner),
)


# --- the form, once --family and the model are known ------------------------------------------


def settle_form(meta: dict[str, Any], given: str | None, model_family: str, path: Path) -> dict[str, Any]:
    """A trainer cache's metadata with its family and form settled ("family", "scaled"); InputError when they cannot be.

    `given` is the user's --family (None when not given), `model_family` the loaded model's. Files
    that are not trainer caches come back unchanged.
    """
    families = meta.get("trainer_families")
    if not isinstance(families, list):
        return meta
    trainer = TRAINER_NAMES.get(meta.get("source_format", ""), meta.get("source_format", "trainer"))
    given = given.lower() if given else None
    if given is not None and families and given not in families:
        raise InputError(f"this {trainer} cache holds {' or '.join(families)} latents, not {given} (--family)", path)
    chosen = given or (families[0] if len(families) == 1 else model_family if model_family in families else None)
    scaled = meta.get("scaled")
    if scaled is None and chosen is not None:
        scaled = chosen in meta.get("scaled_families", [])
    if chosen is None and scaled is not False:
        need = f"one of {', '.join(families)}" if families else "the family of the VAE that encoded it"
        raise InputError(f"this {trainer} cache does not record its model family, which sets its latent scale; "
                         f"pass --family ({need})", path)
    known = model_family != "unknown"
    if known and ((chosen is not None and chosen != model_family) or (chosen is None and families and model_family not in families)):
        want = chosen or " or ".join(families)
        raise InputError(f"this {trainer} cache holds {want} latents but the model's family is {model_family}; "
                         f"load a {want} VAE (-m) or name its family (--family)", path)
    return {**meta, "scaled": scaled} | ({"family": chosen} if chosen is not None else {})
