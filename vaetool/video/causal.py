"""Causal video VAEs (Wan 2.1, Qwen-Image): a whole clip -> one latent [1, C, T', h, w] and back.

The model codes time itself (vaetool.nn.wan: the first frame alone, then 4-frame chunks through
a causal conv cache): T = 1 + 4k frames <-> T' = 1 + k latent frames. A clip of another length
is padded to the next 1 + 4k by repeating its last frame; the file records the real count and
decode trims back to it.

On disk: a vaetool .safetensors whose "latent" is 5-D [1, C, T', h, w] (the [B, C, T, h, w] of
diffusers and ComfyUI), metadata `layout` "BCTHW", `frames` (the real count), `latent_frames`,
`time_downscale`, and the family's latent form (per-channel mean/std) as other vaetool files
record it. Per-frame video latents are 4-D [T, C, h, w] (layout "TCHW"); every reader of 4-D
latents refuses a 5-D tensor, so the two cannot be confused. ComfyUI's video .latent files
([B, C, T', h, w] under "latent_tensor", raw) are read too (frames = 1 + 4(T' - 1), B = 1).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from vaetool.api import Vae
from vaetool.errors import InputError
from vaetool.families import LatentFormat
from vaetool.io.images import pad_to_multiple, to_uint8
from vaetool.io.latent_item import COMFY_LEGACY_SCALE, COMFY_MARKER, decode_metadata
from vaetool.precision import Fp32Fallback, is_finite
from vaetool.video.frames import Frame

__all__ = [
    "CAUSAL_LAYOUT",
    "FRAME_LAYOUT",
    "CausalHeader",
    "CausalLatents",
    "causal_header",
    "causal_metadata",
    "decode_causal",
    "decoded_frames",
    "encode_causal",
    "is_causal_vae",
    "load_causal",
    "padded_frames",
    "save_causal",
]

CAUSAL_LAYOUT = "BCTHW"  # metadata "layout" of a whole-clip latent [1, C, T', h, w]
FRAME_LAYOUT = "TCHW"  # metadata "layout" of per-frame video latents [T, C, h, w]
CONTAINER_SUFFIXES = (".safetensors", ".sft", ".latent")  # safetensors files that may hold a causal video latent


class CausalLatents(NamedTuple):
    """A whole-clip latent [1, C, T', h, w] float32 on CPU, the frames it stands for, its metadata and source form."""

    latents: torch.Tensor
    frames: int
    metadata: dict[str, Any]
    source_format: str  # "vaetool" or "comfyui"


def is_causal_vae(vae: Vae) -> bool:
    """Whether the model codes whole clips through time itself (WanVAE: encode_video_moments / decode_video)."""
    return all(hasattr(vae.model, name) for name in ("encode_video_moments", "decode_video", "time_downscale"))


def padded_frames(frames: int, factor: int) -> int:
    """The frames the model codes for `frames` real ones: the next 1 + factor * k (>= frames)."""
    return 1 + factor * -(-(frames - 1) // factor)


def decoded_frames(latent_frames: int, factor: int) -> int:
    """Frames that `latent_frames` latent frames decode to: 1 + factor * (T' - 1)."""
    return 1 + factor * (latent_frames - 1)


def _finite(out: torch.Tensor, what: str, source: str | Path | None) -> torch.Tensor:
    if not is_finite(out):
        raise InputError(f"the model's output for {what} has NaN/inf values", source)
    return out


def encode_causal(
    vae: Vae,
    frames: Iterable[Frame],
    *,
    scaled: bool = False,
    fallback: Fp32Fallback | None = None,
    source: str | Path | None = None,
    notice: Callable[[str], None] | None = None,
    tile: int | None = None,
    overlap: int | None = None,
) -> tuple[torch.Tensor, int, tuple[int, int]]:
    """Frames (all one size) -> (latent [1, C, T', ceil(H/f), ceil(W/f)] float32 on CPU, real frame count, (H, W)).

    The posterior mode. Frames are padded bottom/right to a multiple of the downscale (replicate)
    and in time to 1 + 4k by repeating the last frame (`notice` hears it). `tile`: fast spatial
    tiles of that edge in image px, tile by tile through the clip (vaetool.tiling.causal_encode),
    `overlap` px shared.
    """
    from vaetool.tiling.causal_encode import encode_video_fast

    fallback = fallback or Fp32Fallback(vae)
    images = [frame.image for frame in frames]
    if not images:
        raise ValueError("no frames to encode")
    count, factor = len(images), int(vae.model.time_downscale)
    size = (int(images[0].shape[1]), int(images[0].shape[2]))
    total = padded_frames(count, factor)
    if total != count and notice is not None:
        notice(f"{count} frames is not 1 + {factor}k: padded to {total} by repeating the last frame (decode gives {count})")
    video, _ = pad_to_multiple(torch.stack(images + images[-1:] * (total - count)), vae.downscale)  # [T, 3, H', W']
    x = video.permute(1, 0, 2, 3)[None]  # [1, 3, T, H', W']
    del images, video
    what = f"the clip ({total} frames)"

    def call(v: Vae) -> torch.Tensor:
        with torch.inference_mode():
            xv = x.to(v.device, v.dtype)
            if tile is None:
                return v.model.encode_video_moments(xv)  # [1, 2C, T', h, w]
            return encode_video_fast(v.model, xv, tile_size=tile, overlap=overlap)  # [1, 2C, T', h, w]

    moments = _finite(fallback(call, what), what, source)
    mean = moments[:, : vae.latent_format.channels].float().cpu()  # [1, C, T', h, w]
    return (vae.latent_format.to_scaled(mean) if scaled else mean), count, size


def decode_causal(
    vae: Vae,
    latents: torch.Tensor,
    *,
    frames: int,
    size: tuple[int, int] | None = None,
    scaled: bool = False,
    fmt: LatentFormat | None = None,
    fallback: Fp32Fallback | None = None,
    source: str | Path | None = None,
    tile: int | None = None,
    overlap: int | None = None,
    order: str = "frames",
) -> Iterator[np.ndarray]:
    """Latent [1, C, T', h, w] -> the first `frames` uint8 frames [H, W, 3], cropped to `size` (H, W) when given.

    Scaled latents are made raw with `fmt` (the file's recorded form; default: the model's). Streamed:
    the model decodes one latent frame (4 frames) at a time through its causal cache, and each
    frame goes out before the next latent frame is decoded. `tile`: fast spatial tiles of that
    edge in image px (vaetool.tiling.causal), `overlap` px shared, in `order` "frames" (frame-major,
    streamed) or "tiles" (tile-major: the clip is decoded before its first frame goes out). A half-precision chunk that is
    not finite restarts the clip in fp32 (the cache holds its past), past the frames already given.
    """
    from vaetool.precision import HALF_DTYPES
    from vaetool.tiling.causal import decode_video_fast, decode_video_tiles

    fallback = fallback or Fp32Fallback(vae)
    z = (fmt or vae.latent_format).to_raw(latents) if scaled else latents  # [1, C, T', h, w]
    what = f"the clip ({latents.shape[2]} latent frames)"

    def chunks(v: Vae) -> Iterator[torch.Tensor]:
        zv = z.to(v.device, v.dtype)
        if tile is None:
            return v.model.decode_video_frames(zv)
        tiled = decode_video_tiles if order == "tiles" else decode_video_fast
        return tiled(v.model, zv, tile_size=tile, overlap=overlap)

    model, given = vae, 0
    while True:
        stream, done, k = chunks(model), 0, 0
        while done < frames:
            with torch.inference_mode():
                chunk = next(stream, None)  # [1, 3, 1 or 4, H, W]
            if chunk is None:
                return
            n = chunk.shape[2]
            if done + n <= given:  # already given before an fp32 restart
                done, k = done + n, k + 1
                continue
            if not is_finite(chunk):
                if model.dtype in HALF_DTYPES and model is vae:
                    model = fallback.redo(what)
                    break
                raise InputError(f"the model's output for {what} has NaN/inf values (latent frame {k})", source)
            video = chunk[0, :, : frames - done].float().cpu()  # [3, n', H, W]
            if size is not None:
                video = video[..., : size[0], : size[1]]
            for t in range(video.shape[1]):
                yield to_uint8(video[:, t])
            done, k = done + n, k + 1
            given = max(given, min(done, frames))
        else:
            return


def causal_metadata(base: dict[str, Any], fmt: LatentFormat, *, frames: int, latent_frames: int, factor: int) -> dict[str, Any]:
    """A whole-clip latent file's metadata: the per-frame video metadata `base` plus layout, counts and the latent form."""
    form = {k: v for k, v in fmt.as_dict().items() if k not in base and k != "channels"}  # per-channel mean/std
    return (
        base | form | {"layout": CAUSAL_LAYOUT, "frames": int(frames), "latent_frames": int(latent_frames), "time_downscale": int(factor)}
    )


def save_causal(path: str | Path, latents: torch.Tensor, metadata: dict[str, Any], *, overwrite: bool = False) -> None:
    """Write a whole-clip latent [1, C, T', h, w] with its metadata, atomically."""
    from vaetool.io.atomic import atomic_write
    from vaetool.io.latent_item import FORMAT, FORMAT_VERSION, encode_metadata
    from vaetool.io.safe import write_safetensors

    if latents.ndim != 5 or latents.shape[0] != 1:
        raise ValueError(f"expected a whole-clip latent [1, C, T', h, w], got {tuple(latents.shape)}")
    tensors = {"latent": latents.detach().float().cpu().contiguous()}
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, **encode_metadata({k: v for k, v in metadata.items() if v is not None})}
    atomic_write(path, lambda tmp: write_safetensors(tmp, tensors, header), overwrite=overwrite)


class CausalHeader(NamedTuple):
    """What the header of a whole-clip latent file says (no tensor read)."""

    source_format: str  # "vaetool" (layout "BCTHW") or "comfyui" (a 5-D latent_tensor of more than one latent frame)
    key: str  # the latent tensor's name
    shape: list[int]
    metadata: dict[str, str]  # as stored (strings)
    legacy_comfy: bool  # a ComfyUI file without the version marker: it holds raw * 0.18215


def causal_header(path: Path) -> CausalHeader | None:
    """The header of `path` when it holds a whole-clip video latent, else None (reads only the header)."""
    from vaetool.io.safe import looks_like_safetensors, safetensors_header

    if not path.is_file() or not path.name.lower().endswith(CONTAINER_SUFFIXES) or not looks_like_safetensors(path):
        return None
    header, meta = safetensors_header(path, InputError)
    if meta.get("layout") == CAUSAL_LAYOUT and "latent" in header:
        return CausalHeader("vaetool", "latent", [int(n) for n in header["latent"].get("shape", ())], meta, False)
    shape = [int(n) for n in header.get("latent_tensor", {}).get("shape", ())]
    if len(shape) == 5 and shape[2] > 1:
        return CausalHeader("comfyui", "latent_tensor", shape, meta, COMFY_MARKER not in header)
    return None


def refuse_in_image_decode(path: Path) -> None:
    """InputError when `path` is a whole-clip video latent, which `vaetool decode` (images) does not read."""
    found = causal_header(path)
    if found is not None and found.source_format == "vaetool":
        shape = found.shape
        frames = f" ({shape[2]} latent frames)" if len(shape) == 5 else ""
        raise InputError(
            f"a video latent {shape}{frames}: `vaetool decode` takes image latents; decode it with `vaetool video decode`", path
        )


def load_causal(path: Path, factor: int) -> CausalLatents:
    """A whole-clip latent file, checked: 5-D [1, C, T', h, w], finite, and a frame count that T' decodes to."""
    from vaetool.io.latent_item import validate_latent
    from vaetool.io.safe import read_safetensors

    found = causal_header(path)
    if found is None:
        raise InputError(f"not a whole-clip video latent (no layout {CAUSAL_LAYOUT}, no 5-D ComfyUI latent)", path)
    kind, key, shape, raw = found.source_format, found.key, found.shape, found.metadata
    if len(shape) != 5 or shape[0] != 1:
        raise InputError(f"{key} has shape {shape}; expected one clip [1, C, T', h, w]", path)
    tensor = read_safetensors(path, InputError, [key])[key]
    latents = validate_latent(tensor.flatten(1, 2), path, key).unflatten(1, tuple(shape[1:3]))  # [1, C, T', h, w] checked
    longest = decoded_frames(shape[2], factor)
    if kind == "comfyui":
        meta: dict[str, Any] = {"source_format": "comfyui", "latent_format": "raw", "frames": longest}
        if found.legacy_comfy:
            latents = latents / COMFY_LEGACY_SCALE  # legacy files hold raw * 0.18215 whatever the model
        return CausalLatents(latents, longest, meta, kind)
    meta = decode_metadata(raw, path)
    frames = meta.get("frames")
    fewest = max(1, longest - factor + 1)  # a clip padded to `longest` had at least this many frames
    if not isinstance(frames, int) or isinstance(frames, bool) or not fewest <= frames <= longest:
        raise InputError(
            f"metadata frames {frames!r} does not fit {shape[2]} latent frames, which decode to {longest} "
            f"(a clip padded to 1 + {factor}k frames had {fewest}-{longest})",
            path,
        )
    recorded = meta.get("time_downscale")
    if recorded is not None and recorded != factor:
        raise InputError(f"the latents were made with {recorded} frames per latent frame, the model has {factor}", path)
    return CausalLatents(latents, frames, meta, kind)
