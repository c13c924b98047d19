"""The Wan video decode's memory: the estimate of each way to run it and the planner that picks one for a budget.

A decode holds one chunk's working set (the image estimate of `time_downscale` frames:
vaetool.memory's estimate_peak untiled, estimate_tile_peak for a fast tile), the causal caches
(`cache_bytes`: each causal conv's past frames; frame-major, summed over all tiles with their
overlaps; tile-major, one tile's) and, tile-major, the whole clip's `low` and float32
accumulator (vaetool.tiling.causal), and the top level's causal conv input with its two past
frames (`past_bytes`). The sum is scaled by VIDEO_SCALE, measured (bench/calibrate_wan_video.py,
docs/memory.md) with glibc's mmap threshold fixed as `vaetool video decode` fixes it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from vaetool import memory
from vaetool.errors import MemoryBudgetError
from vaetool.nn.causal import CausalConv3d
from vaetool.nn.util import loaded_weight
from vaetool.nn.wan import Decoder3d, Resample, WanVAE
from vaetool.tiling import Tiling
from vaetool.tiling.causal import ORDERS, video_tiles

__all__ = ["VIDEO_SCALE", "VideoChoice", "cache_bytes", "past_bytes", "plan_video", "video_need"]

# The pieces' sum is 0.97-1.10 of the measured peak over the calibration cases, fp32 and bf16 alike (docs/memory.md), with glibc's
# mmap threshold fixed (vaetool.memory.return_freed_memory, as `vaetool video decode` runs): without it bf16 held up to 2.5x
# its tensors (freed blocks under glibc's dynamic 32 MiB threshold stay in the heap), which no per-dtype factor fits.
VIDEO_SCALE = 1.04


class VideoChoice(NamedTuple):
    """What a video decode runs: mode "off" or "fast", the tile edge, the order ("frames", "tiles"; None untiled), the estimate."""

    mode: str
    tile_size: int | None
    order: str | None
    need: int | None  # bytes estimated (None: not estimated, e.g. --tile off)


def cache_elements(blocks: Sequence[nn.Module], height: int, width: int) -> int:
    """Elements per batch item a FrameCache holds running `blocks` on height x width px: each causal conv's past frames.

    A Resample moves the size (up: x2; down: /2 rounded up); a downsample3d also keeps its last
    frame after the spatial stride, for the next chunk's time conv.
    """
    total, h, w = 0, height, width
    for block in blocks:
        for m in block.modules():
            if isinstance(m, CausalConv3d) and m.time_pad:
                total += m.time_pad * m.in_channels * h * w  # [B, Cin, time_pad, h, w]
        if isinstance(block, Resample) and block.mode.startswith("up"):
            h, w = 2 * h, 2 * w
        elif isinstance(block, Resample) and block.mode.startswith("down"):
            h, w = math.ceil(h / 2), math.ceil(w / 2)
            if block.mode == "downsample3d":
                total += block.time_conv.in_channels * h * w
    return total


def cache_bytes(decoder: Decoder3d, height: int, width: int, batch: int = 1, elem: int = 4) -> int:
    """Bytes the FrameCache holds decoding a latent of height x width latent px: each causal conv's past frames."""
    return cache_elements([decoder.conv1, *decoder.middle, *decoder.upsamples, decoder.head], height, width) * batch * elem


def _low_channels(decoder: Decoder3d) -> int:
    """Channels of `Decoder3d.low`'s output (the first upsample's input)."""
    cut = decoder.cut()
    return decoder.upsamples[cut].resample[1].in_channels if cut < len(decoder.upsamples) else decoder.head[2].in_channels


def past_bytes(channels: int, height: int, width: int, batch: int, elem: int, frames: int = 2) -> int:
    """A full-resolution causal conv's input with its past: [past, chunk] (`frames` more than the chunk) and oneDNN's copy of it.

    The image estimate of a 4-frame chunk counts 4 input frames; at the top level the conv reads 6.
    """
    return 2 * frames * channels * height * width * batch * elem


def video_need(
    model: WanVAE,
    latent_shape: tuple[int, ...],
    dtype: torch.dtype,
    tile: int | None = None,
    order: str = "frames",
    overlap: int | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, int]:
    """The estimate's pieces in bytes (before VIDEO_SCALE) for a latent clip [B, C, t, h, w]: untiled (tile None) or one order."""
    b, _, t, h, w = latent_shape
    f, td = int(model.downscale), int(model.time_downscale)
    height, width, elem = h * f, w * f, dtype.itemsize
    kw = {"dtype": dtype, "device": device}
    out = b * 3 * td * height * width * 4  # a chunk of frames in float32 as the writers get it
    top = model.decoder.head[2].in_channels
    if tile is None:
        chunk = memory.estimate_peak(model, "decode", height, width, td * b, **kw)
        past = past_bytes(top, height, width, b, elem)
        return {"chunk": chunk, "past": past, "caches": cache_bytes(model.decoder, h, w, b, elem), "output": out}
    tiles = video_tiles(h, w, f, tile, overlap)
    r, c = max(tiles, key=lambda rc: (rc[0].hi - rc[0].lo) * (rc[1].hi - rc[1].lo))  # the largest tile
    th, tw = (r.hi - r.lo) * f, (c.hi - c.lo) * f
    past = past_bytes(top, th, tw, b, elem)
    if order == "frames":
        rows, cols = sorted({(r.lo, r.hi) for r, _ in tiles}), sorted({(c.lo, c.hi) for _, c in tiles})
        extent = sum(hi - lo for lo, hi in rows), sum(hi - lo for lo, hi in cols)  # overlaps counted twice
        chunk = memory.estimate_tile_peak(model, "decode", tile, td * b, mode="fast", height=height, width=width, **kw)
        return {"chunk": chunk, "past": past, "caches": cache_bytes(model.decoder, *extent, b, elem), "output": out}
    if order != "tiles":
        raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    chunk = memory.estimate_tile_peak(model, "decode", tile, td * b, mode="fast", height=min(th, height), width=min(tw, width), **kw)
    frames = 1 + td * (t - 1)
    clip = b * 3 * frames * height * width * 4 + b * _low_channels(model.decoder) * t * h * w * elem  # accumulator + low
    caches = cache_bytes(model.decoder, r.hi - r.lo, c.hi - c.lo, b, elem)
    return {"chunk": chunk, "past": past, "caches": caches, "output": out, "clip": clip}


def estimate_video(model: WanVAE, latent_shape: tuple[int, ...], dtype: torch.dtype, tile: int | None = None, order: str = "frames",
                   overlap: int | None = None, device: str | torch.device = "cpu") -> int:  # fmt: skip
    """Estimated peak bytes of a video decode (weights included): `video_need`'s pieces times VIDEO_SCALE."""
    pieces = video_need(model, latent_shape, dtype, tile, order, overlap, device)
    return int(VIDEO_SCALE * sum(pieces.values()))


def plan_video(model: WanVAE, latent_shape: tuple[int, ...], tiling: Tiling) -> VideoChoice:
    """Untiled, else frame-major fast tiles of the largest edge that fits the budget, else tile-major, for a latent clip.

    `--tile exact` is read as fast (no exact tiles for a causal video). A given tile size is used
    as is, frame-major when it fits the budget, else tile-major.
    """
    _, _, _, h, w = latent_shape
    f = int(model.downscale)
    if tiling.mode == "off":
        return VideoChoice("off", None, None, None)
    weight = loaded_weight(model)
    device, dtype = weight.device, weight.dtype
    budget = memory.budget_for(model, tiling.budget, device)

    def need(tile: int | None, order: str = "frames") -> int:
        return estimate_video(model, latent_shape, dtype, tile, order, tiling.overlap, device)

    if tiling.tile_size is not None and tiling.mode != "auto":
        order = next((o for o in ORDERS if need(tiling.tile_size, o) <= budget), ORDERS[-1])
        return VideoChoice("fast", tiling.tile_size, order, need(tiling.tile_size, order))
    height, width = h * f, w * f
    untiled = need(None)
    if untiled <= budget:
        whole = max(height, width)
        return VideoChoice("off", None, None, untiled) if tiling.mode == "auto" else VideoChoice("fast", whole, "frames", untiled)
    step = f * memory.TILE_STEP
    for order in ORDERS:
        tile = memory.largest_tile(lambda t, order=order: need(t, order) <= budget, height, width, step)
        if tile is not None:
            return VideoChoice("fast", tile, order, need(tile, order))
    by_frame, by_tile = (memory.format_bytes(need(step, o), round_up=True) for o in ORDERS)
    raise MemoryBudgetError(
        f"{memory.format_bytes(budget)} is too small to decode a {width}x{height} video of {latent_shape[2]} latent frames: "
        f"the smallest tile ({step} px, fast mode) needs {by_frame} frame-major, {by_tile} tile-major (which holds the whole clip)"
    )
