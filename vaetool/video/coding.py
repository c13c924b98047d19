"""Videos through a Vae: frames -> latents [T, C, h, w] with the image encoder, latents -> frames
with the temporal decoder a chunk at a time (or an image-only decoder frame by frame).

Every model call goes through the tiling front door (`Vae.moments` / `Vae.decode` with a
`vaetool.tiling.Tiling`), so spatial tiling (exact or fast: both handle the temporal layers'
per-clip GroupNorm and time convolutions) applies to every batch of frames and every chunk when
asked for or when the memory planner says it does not fit; half-precision calls with NaN/inf
output are redone in fp32 (`vaetool.precision.Fp32Fallback`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from vaetool import memory
from vaetool.api import Vae
from vaetool.errors import ConfigError, InputError, MemoryBudgetError
from vaetool.io.images import pad_to_multiple, to_uint8
from vaetool.precision import Fp32Fallback, is_finite
from vaetool.tiling import Tiling, choose
from vaetool.video.chunks import ChunkDecodeFn, iter_decode_chunks, validate_chunking
from vaetool.video.frames import Frame

__all__ = [
    "DEFAULT_CHUNK_FRAMES", "DEFAULT_OVERLAP", "DecodePlan", "decode_video", "encode_frames", "frame_decoder",
    "is_temporal", "plan_decode",
]

DEFAULT_CHUNK_FRAMES = 14  # SVD's decode_chunk_size: the clip length it was trained to decode
DEFAULT_OVERLAP = 3  # frames shared by consecutive chunks (capped at half a chunk); see bench/bench_video.py
DEFAULT_BATCH = 4  # frames per image-decoder call when the planner is not asked (--tile off)
MAX_AUTO_BATCH = 16  # the most frames per call the planner is asked for
MIN_CHUNK_FRAMES = 8  # with too little memory, chunks are tiled rather than cut below this many frames


def is_temporal(vae: Vae) -> bool:
    """Whether the VAE's decoder has temporal layers (an SVD VideoDecoder)."""
    from vaetool.nn.temporal import VideoDecoder

    return isinstance(vae.model.decoder, VideoDecoder)


@dataclass(frozen=True)
class DecodePlan:
    """How latents become frames: frames per decoder call, frames shared by chunks, and each call's tiling."""

    temporal: bool
    chunk_frames: int
    overlap: int
    tiling: Tiling = field(default_factory=Tiling)


def _planned_chunk(vae: Vae, height: int, width: int, want: int, tiling: Tiling) -> tuple[int, Tiling]:
    """(chunk frames, their tiling) for a temporal decoder: tile rather than cut chunks below MIN_CHUNK_FRAMES.

    The planner prefers fewer frames untiled to more frames tiled; for a temporal decoder fewer
    frames means less temporal context, so when it offers fewer than the floor, the floor's frames
    are tiled with each frame's share of the budget beyond the weights (or, if that is too small,
    the planner's plan stands).
    """
    planned = choose(vae, "decode", want, height, width, tiling).batch_size
    floor = min(MIN_CHUNK_FRAMES, want)
    if planned >= floor:
        return planned, tiling
    weights = sum(t.numel() * t.element_size() for t in vae.model.parameters())  # resident whatever the frames
    budget = tiling.budget or memory.budget_for(vae.model, None, vae.device)
    share = replace(tiling, max_memory=weights + max(0, budget - weights) // floor)
    try:
        one = choose(vae, "decode", 1, height, width, share)
    except MemoryBudgetError:
        return planned, tiling
    if one.mode == "off":
        return floor, tiling
    return floor, replace(tiling, mode=one.mode, tile_size=one.tile_size)


def plan_decode(
    vae: Vae,
    frames: int,
    height: int,
    width: int,
    *,
    chunk_frames: int | None = None,
    overlap: int | None = None,
    batch_size: int | None = None,
    tiling: Tiling | None = None,
) -> DecodePlan:
    """Chunking and tiling for decoding `frames` frames of height x width image pixels.

    Temporal decoder: chunks of `chunk_frames` (default: the most, up to DEFAULT_CHUNK_FRAMES, the
    memory planner fits) sharing `overlap` frames (default DEFAULT_OVERLAP, at most half a chunk).
    Image-only decoder: independent frames in batches of `batch_size`, no overlap.
    """
    tiling = tiling or Tiling()
    temporal = is_temporal(vae)
    fixed = chunk_frames if temporal else batch_size
    want = fixed or max(1, min(DEFAULT_CHUNK_FRAMES if temporal else MAX_AUTO_BATCH, frames))
    chunk, chunk_tiling = fixed, tiling
    if not fixed and tiling.mode != "off":
        if temporal:
            chunk, chunk_tiling = _planned_chunk(vae, height, width, want, tiling)
        else:
            chunk = choose(vae, "decode", want, height, width, tiling).batch_size
    chunk = chunk or (want if temporal else min(DEFAULT_BATCH, want))
    if not temporal:
        return DecodePlan(False, chunk, 0, chunk_tiling)
    ov = min(DEFAULT_OVERLAP, chunk // 2) if overlap is None else overlap
    try:
        validate_chunking(chunk, ov)
    except ValueError as err:
        raise ConfigError(f"--chunk-frames {chunk} / --overlap {ov}: {err}") from None
    return DecodePlan(True, chunk, ov, chunk_tiling)


def _finite(out: torch.Tensor, what: str, source: str | Path | None) -> torch.Tensor:
    """`out`, or an InputError naming the input when it holds NaN/inf even after the fp32 redo."""
    if not is_finite(out):
        raise InputError(f"the model's output for {what} has NaN/inf values", source)
    return out


def frame_decoder(
    vae: Vae, plan: DecodePlan, *, scaled: bool = False, fallback: Fp32Fallback | None = None, source: str | Path | None = None
) -> ChunkDecodeFn:
    """decode(z [L, C, h, w], L) -> images [L, 3, h*f, w*f]: one clip of L frames (or L independent frames)."""
    fallback = fallback or Fp32Fallback(vae)
    chunk = 0

    def decode(z: torch.Tensor, n: int) -> torch.Tensor:
        nonlocal chunk
        chunk += 1
        what = f"decoder chunk {chunk} ({z.shape[0]} frames)"
        timesteps = n if plan.temporal else None
        out = fallback(lambda v: v.decode(z, scaled=scaled, tiling=plan.tiling, timesteps=timesteps, clamp=False), what)  # [L, 3, H, W]
        return _finite(out, what, source)

    return decode


def decode_video(
    vae: Vae, latents: torch.Tensor, plan: DecodePlan, *, scaled: bool = False, size: tuple[int, int] | None = None,
    fallback: Fp32Fallback | None = None, source: str | Path | None = None,
) -> Iterator[np.ndarray]:
    """Latents [T, C, h, w] -> uint8 frames [H, W, 3] in order, cropped to `size` (H, W) when given."""
    decode = frame_decoder(vae, plan, scaled=scaled, fallback=fallback, source=source)
    overlap = plan.overlap if plan.temporal else 0
    for _, images in iter_decode_chunks(decode, latents, plan.chunk_frames, overlap):
        images = images.cpu()  # [n, 3, H, W]
        if size is not None:
            images = images[..., : size[0], : size[1]]
        for image in images:
            yield to_uint8(image)


def encode_frames(
    vae: Vae,
    frames: Iterable[Frame],
    *,
    batch_size: int | None = None,
    tiling: Tiling | None = None,
    scaled: bool = False,
    fallback: Fp32Fallback | None = None,
    source: str | Path | None = None,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Frames (all one size) -> (latents [T, C, ceil(H/f), ceil(W/f)] float32 on CPU, (H, W)); posterior mode.

    Frames are padded on the bottom/right to a multiple of the VAE's downscale (replicate);
    decode crops back to (H, W).
    """
    tiling = tiling or Tiling()
    fallback = fallback or Fp32Fallback(vae)
    f = vae.downscale
    out: list[torch.Tensor] = []
    batch: list[torch.Tensor] = []
    size: tuple[int, int] | None = None

    def flush() -> None:
        x, _ = pad_to_multiple(torch.stack(batch), f)  # [B, 3, H', W']
        first = sum(len(z) for z in out)
        what = f"frames {first}-{first + len(batch) - 1}"
        mean = _finite(fallback(lambda v: v.moments(x, tiling=tiling)[0], what), what, source).float().cpu()  # [B, C, h, w]
        out.append(vae.latent_format.to_scaled(mean) if scaled else mean)
        batch.clear()

    for frame in frames:
        if size is None:
            size = (int(frame.image.shape[1]), int(frame.image.shape[2]))
            if batch_size is None:
                planned = None if tiling.mode == "off" else choose(vae, "encode", MAX_AUTO_BATCH, size[0], size[1], tiling).batch_size
                batch_size = max(1, planned or DEFAULT_BATCH)
        batch.append(frame.image)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if size is None:
        raise ValueError("no frames to encode")
    return torch.cat(out), size
