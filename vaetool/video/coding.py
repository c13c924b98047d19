"""Videos through a Vae: frames -> latents [T, C, h, w] with the image encoder, latents -> frames
with the temporal decoder a chunk at a time (or an image-only decoder frame by frame).

Spatial tiling (vaetool.tiling, exact or fast: both handle the temporal layers' per-clip
GroupNorm and time convolutions) applies to every batch of frames and every chunk when asked
for, or when the memory planner (vaetool.memory) says a chunk does not fit; without a planner
`auto` runs untiled.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vaetool.api import Vae
from vaetool.errors import ConfigError, InputError
from vaetool.io.images import pad_to_multiple, to_uint8
from vaetool.video.chunks import DecodeFn, iter_decode_chunks, validate_chunking
from vaetool.video.frames import Frame

__all__ = [
    "DEFAULT_CHUNK_FRAMES", "DEFAULT_OVERLAP", "DecodePlan", "decode_video", "encode_frames", "frame_decoder",
    "is_temporal", "plan_decode",
]

DEFAULT_CHUNK_FRAMES = 14  # SVD's decode_chunk_size: the clip length it was trained to decode
DEFAULT_OVERLAP = 3  # frames shared by consecutive chunks (capped at half a chunk); see bench/bench_video.py
DEFAULT_BATCH = 4  # frames per encoder / image-decoder call without a memory planner
MAX_AUTO_BATCH = 16  # the most frames per call the planner is asked for
MIN_CHUNK_FRAMES = 8  # with too little memory, chunks are tiled rather than cut below this many frames
DEFAULT_TILE = 512  # image pixels, --tile exact/fast without --tile-size or a planner
# --tile mode -> (module, function) of the tiled decoder; both take timesteps for a temporal decoder
TILED_DECODERS: dict[str, tuple[str, str]] = {
    "exact": ("vaetool.tiling.exact", "decode_exact"),
    "fast": ("vaetool.tiling.fast", "decode_fast"),
}
TILE_MODES = ("auto", "off", *TILED_DECODERS)


def is_temporal(vae: Vae) -> bool:
    """Whether the VAE's decoder has temporal layers (an SVD VideoDecoder)."""
    from vaetool.nn.temporal import VideoDecoder

    return isinstance(vae.model.decoder, VideoDecoder)


@dataclass(frozen=True)
class DecodePlan:
    """How latents become frames: frames per decoder call, frames shared by chunks, tile (None: untiled)."""

    temporal: bool
    chunk_frames: int
    overlap: int
    tile: int | None
    tile_mode: str = "exact"


def _planned(vae: Vae, op: str, height: int, width: int, batch: int, max_memory: str | int | None) -> tuple[int, int | None] | None:
    """(batch that fits, tile or None) from the memory planner, or None without one."""
    from vaetool.pipeline import memory_plan

    p = memory_plan(vae, op, height, width, batch, max_memory)
    return None if p is None else (int(p.batch_size), None if p.fits_untiled else int(p.tile))


def _planned_chunk(vae: Vae, height: int, width: int, want: int, max_memory: str | None) -> tuple[int, int | None] | None:
    """(chunk frames, tile or None) for a temporal decoder: tile rather than cut chunks below MIN_CHUNK_FRAMES.

    The planner prefers fewer frames untiled to more frames tiled; for a temporal decoder fewer
    frames means less temporal context, so when it offers fewer than the floor, the floor's frames
    are tiled with each frame's share of the budget beyond the weights (or, if that is too small, the planner's plan stands).
    """
    from vaetool.errors import MemoryBudgetError
    from vaetool.pipeline import memory_plan

    p = memory_plan(vae, "decode", height, width, want, max_memory)
    if p is None:
        return None
    floor = min(MIN_CHUNK_FRAMES, want)
    if p.batch_size >= floor:
        return int(p.batch_size), None if p.fits_untiled else int(p.tile)
    weights = sum(t.numel() * t.element_size() for t in vae.model.parameters())  # resident whatever the frames
    try:
        share = memory_plan(vae, "decode", height, width, 1, weights + max(0, p.budget - weights) // floor)
    except MemoryBudgetError:
        return int(p.batch_size), None if p.fits_untiled else int(p.tile)
    return floor, None if share.fits_untiled else int(share.tile)


def _tile(mode: str, tile_size: int | None, planned: int | None) -> tuple[int | None, str]:
    """(tile px or None, tiled decoder) for --tile MODE: off never tiles, exact/fast always, auto when the planner says so."""
    if mode not in TILE_MODES:
        raise ConfigError(f"--tile {mode} is not available for video; choose one of {', '.join(TILE_MODES)}")
    if mode == "off":
        return None, "exact"
    if mode == "auto":
        return (None if planned is None else tile_size or planned), "exact"
    return tile_size or planned or DEFAULT_TILE, mode


def plan_decode(
    vae: Vae,
    frames: int,
    height: int,
    width: int,
    *,
    chunk_frames: int | None = None,
    overlap: int | None = None,
    batch_size: int | None = None,
    tile: str = "auto",
    tile_size: int | None = None,
    max_memory: str | None = None,
) -> DecodePlan:
    """Chunking and tiling for decoding `frames` frames of height x width image pixels.

    Temporal decoder: chunks of `chunk_frames` (default: the most, up to DEFAULT_CHUNK_FRAMES, the
    memory planner fits) sharing `overlap` frames (default DEFAULT_OVERLAP, at most half a chunk).
    Image-only decoder: independent frames in batches of `batch_size`, no overlap.
    """
    temporal = is_temporal(vae)
    fixed = chunk_frames if temporal else batch_size
    want = fixed or max(1, min(DEFAULT_CHUNK_FRAMES if temporal else MAX_AUTO_BATCH, frames))
    if tile == "off":
        planned = None
    elif temporal and not fixed:
        planned = _planned_chunk(vae, height, width, want, max_memory)
    else:
        planned = _planned(vae, "decode", height, width, want, max_memory)
    chunk = fixed or (planned[0] if planned else want if temporal else min(DEFAULT_BATCH, want))
    tile_px, tile_mode = _tile(tile, tile_size, planned[1] if planned else None)
    if not temporal:
        return DecodePlan(False, chunk, 0, tile_px, tile_mode)
    ov = min(DEFAULT_OVERLAP, chunk // 2) if overlap is None else overlap
    try:
        validate_chunking(chunk, ov)
    except ValueError as err:
        raise ConfigError(f"--chunk-frames {chunk} / --overlap {ov}: {err}") from None
    return DecodePlan(True, chunk, ov, tile_px, tile_mode)


class Fp32Retry:
    """Run a model call; when a half-precision model's output holds NaN/inf, redo it with an fp32 copy (built once)."""

    def __init__(self, vae: Vae, source: str | Path | None = None, notice: Callable[[str], None] | None = None) -> None:
        self.vae, self.source, self.notice = vae, source, notice
        self.fp32: Vae | None = None
        self.retries = 0

    def __call__(self, call: Callable[[Vae], torch.Tensor], what: str) -> torch.Tensor:
        """call(vae) -> tensor, redone in fp32 if it is not finite; an InputError naming `source` if fp32 fails too."""
        from vaetool.pipeline import HALF_DTYPES, fp32_copy

        out = call(self.vae)
        if bool(torch.isfinite(out).all()):
            return out
        if self.vae.dtype in HALF_DTYPES:
            if self.fp32 is None:
                self.fp32 = fp32_copy(self.vae)
                if self.notice is not None:
                    self.notice(f"NaN/inf in the half-precision output for {what}: redoing it in fp32 (and any later such call)")
            self.retries += 1
            out = call(self.fp32)
        if not bool(torch.isfinite(out).all()):
            raise InputError(f"the model's output for {what} has NaN/inf values", self.source)
        return out


def frame_decoder(vae: Vae, plan: DecodePlan, *, scaled: bool = False, retry: Fp32Retry | None = None) -> DecodeFn:
    """decode(z [L, C, h, w], L) -> images [L, 3, h*f, w*f]: one clip of L frames (or L independent frames)."""
    if plan.tile is None:
        tiled = None
    else:
        module, name = TILED_DECODERS[plan.tile_mode]
        try:
            tiled = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            raise ConfigError(f"--tile {plan.tile_mode} needs {module}, which this installation lacks; use --tile off") from None

    def run(v: Vae, z: torch.Tensor, n: int) -> torch.Tensor:
        kw = {"timesteps": n} if plan.temporal else {}
        if tiled is None:
            return v.decode(z, scaled=scaled, **kw)  # [L, 3, H, W]
        z = z.to(v.device, v.dtype)
        z = v.latent_format.to_raw(z) if scaled else z
        return tiled(v.model, z, plan.tile, **kw)  # [L, 3, H, W]

    retry = retry or Fp32Retry(vae)
    chunk = 0

    def decode(z: torch.Tensor, n: int) -> torch.Tensor:
        nonlocal chunk
        chunk += 1
        return retry(lambda v: run(v, z, n), f"decoder chunk {chunk} ({z.shape[0]} frames)")

    return decode


def decode_video(
    vae: Vae, latents: torch.Tensor, plan: DecodePlan, *, scaled: bool = False, size: tuple[int, int] | None = None,
    retry: Fp32Retry | None = None,
) -> Iterator[np.ndarray]:
    """Latents [T, C, h, w] -> uint8 frames [H, W, 3] in order, cropped to `size` (H, W) when given."""
    decode = frame_decoder(vae, plan, scaled=scaled, retry=retry)
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
    tile: str = "auto",
    tile_size: int | None = None,
    max_memory: str | None = None,
    scaled: bool = False,
    retry: Fp32Retry | None = None,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Frames (all one size) -> (latents [T, C, ceil(H/f), ceil(W/f)] float32 on CPU, (H, W)); posterior mode.

    Frames are padded on the bottom/right to a multiple of the VAE's downscale (replicate);
    decode crops back to (H, W). `tile`: auto | off | exact | fast, as in vaetool.pipeline.
    """
    from vaetool.pipeline import encoder_moments

    f = vae.downscale
    moments_of = encoder_moments(tile, tile_size, max_memory)  # tiles only when asked or needed
    retry = retry or Fp32Retry(vae)
    out: list[torch.Tensor] = []
    batch: list[torch.Tensor] = []
    size: tuple[int, int] | None = None

    def mean(v: Vae, x: torch.Tensor) -> torch.Tensor:
        return moments_of(v)(x.to(v.device, v.dtype))[0].float().cpu()  # posterior mean [B, C, h, w]

    def flush() -> None:
        x, _ = pad_to_multiple(torch.stack(batch), f)  # [B, 3, H', W']
        first = sum(len(z) for z in out)
        z = retry(lambda v: mean(v, x), f"frames {first}-{first + len(batch) - 1}")
        out.append(vae.latent_format.to_scaled(z) if scaled else z)
        batch.clear()

    for frame in frames:
        if size is None:
            size = (int(frame.image.shape[1]), int(frame.image.shape[2]))
            if batch_size is None:
                planned = _planned(vae, "encode", size[0], size[1], MAX_AUTO_BATCH, max_memory) if tile != "off" else None
                batch_size = max(1, planned[0]) if planned else DEFAULT_BATCH
        batch.append(frame.image)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if size is None:
        raise ValueError("no frames to encode")
    return torch.cat(out), size
