"""Wan 2.1 / Qwen-Image video encode within a budget: spatial tiles, tile-major, through the causal cache.

The causal encoder sees the first frame alone, then chunks of four frames, through one FrameCache
(`WanVAE.encode_video_moments`). Its caches hold two past frames per causal conv at every
resolution, so at full resolution they grow with the frame (0.35 GiB at 256x256 in fp32 for
configs/wan.yaml) on top of one chunk's working set. Fast tiles split the frame as the image fast
encode does (vaetool.tiling.fast.encode_fast): the full-resolution part (`conv1` and the
downsample blocks up to the last Resample, convs only: Wan's RMS norm is per pixel) runs on
overlapping tiles of image px (multiples of the downscale), tile-major: each tile goes through
every chunk of the clip with its own FrameCache, so only one tile's caches are alive at a time.
Each tile's latent-resolution features are cross-faded into a float32 buffer for the whole clip
[B, C, T', h, w] with the image fast mode's windows and cosine ramps (tiling.fast.tile_spans);
then the rest (the last level, the middle block with its per-frame attention, the head and the
quant conv) runs exactly on the whole latent, one chunk at a time through one cache. So the only
error is at the tile edges of the full-resolution convs; one tile over the whole frame is the
untiled encode.

`plan_video_encode` picks untiled or the tile edge from `video_encode_need`: the image estimate for
one chunk plus the caches, the clip itself and (tiled) the feature buffer. Error and peak: docs/memory.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import product

import torch
from torch import nn

from vaetool import memory
from vaetool.errors import InputError, MemoryBudgetError
from vaetool.nn.causal import FrameCache
from vaetool.nn.util import loaded_weight
from vaetool.nn.wan import CHUNK, Encoder3d, Resample, WanVAE
from vaetool.tiling import Choice, Tiling
from vaetool.tiling.causal_plan import cache_elements, past_bytes
from vaetool.tiling.fast import default_overlap, tile_spans

__all__ = ["encode_video_fast", "encoder_cache_bytes", "encoder_cut", "plan_video_encode", "video_encode_need"]


def encoder_cut(encoder: Encoder3d) -> int:
    """Index in `downsamples` after the last Resample: the blocks from there on run at latent resolution."""
    found = [i for i, m in enumerate(encoder.downsamples) if isinstance(m, Resample)]
    return found[-1] + 1 if found else 0


def _high(encoder: Encoder3d) -> list[nn.Module]:
    """The full-resolution part: conv1 and the blocks up to the last Resample (convs and per-pixel norms only)."""
    return [encoder.conv1, *encoder.downsamples[: encoder_cut(encoder)]]


def _low(encoder: Encoder3d) -> list[nn.Module]:
    """The latent-resolution part before the head: the last level and the middle block (with its attention)."""
    return [*encoder.downsamples[encoder_cut(encoder) :], *encoder.middle]


def encoder_cache_bytes(model: WanVAE, height: int, width: int, batch: int = 1, elem: int = 4, *, tile: int | None = None) -> int:
    """Bytes of the encoder's causal caches for height x width image px; `tile`: the full-resolution part on one tile of that edge."""
    enc, f = model.encoder, int(model.downscale)
    th, tw = (height, width) if tile is None else (min(tile, height), min(tile, width))
    latent = cache_elements([*_low(enc), enc.head], math.ceil(height / f), math.ceil(width / f))
    return (cache_elements(_high(enc), th, tw) + latent) * batch * elem


def _padded(frames: int, height: int, width: int, f: int, factor: int) -> tuple[int, int, int]:
    """The (frames, height, width) the encoder sees: 1 + factor * k frames, sides a multiple of f."""
    t = 1 + factor * -(-(frames - 1) // factor)
    return t, -(-height // f) * f, -(-width // f) * f


def video_encode_need(
    model: WanVAE,
    frames: int,
    height: int,
    width: int,
    dtype: torch.dtype,
    tile: int | None = None,
    overlap: int | None = None,
    batch: int = 1,
    device: str | torch.device = "cpu",
) -> int:
    """Bytes an encode of `frames` frames of height x width px needs: untiled (`tile` None) or fast tiles of that edge.

    One chunk's image estimate (weights included) plus the encoder's caches (one tile's at full
    resolution, tiled), the top level's causal conv input with its past frames (`past_bytes`: the
    image estimate counts the chunk's 4, the conv reads up to 2 more; a half input's float32 norm is
    the image estimate's, vaetool.memory_archs._half_norm), the decoded frames with their stack and its copy in `dtype`; tiled, also the
    float32 feature buffer of the whole clip at the cut beyond the chunk's that the tile estimate
    counts. Sizes are padded as the encoder pads them.
    Calibrated by bench/calibrate_wan_video.py (docs/memory.md): 1.0-1.15 of the measured peak.
    """
    f, factor = int(model.downscale), int(model.time_downscale)
    t, height, width = _padded(frames, height, width, f, factor)
    elem = dtype.itemsize
    chunk = min(t, CHUNK) * batch
    # the frames the job decoded (float32 [3, H, W] each, held through the encode), their stack [B, 3, T, H, W], its copy in dtype
    clip = batch * 3 * t * height * width * (2 * 4 + (elem if elem != 4 else 0))
    top = int(model.encoder.conv1.out_channels)
    seen = min(2, max(0, t - CHUNK))  # past frames the top level's convs hold in the last chunk (a 5-frame clip: 1)
    kw = {"dtype": dtype, "device": device}
    if tile is None:
        peak = memory.estimate_peak(model, "encode", height, width, chunk, **kw) + encoder_cache_bytes(model, height, width, batch, elem)
        top_level = past_bytes(top, height, width, batch, elem, seen)
        return peak + top_level + clip
    latent_frames = 1 + (t - 1) // factor
    per_frame = _out_channels(_high(model.encoder)[-1]) * (height // f) * (width // f) * 4
    # the float32 blend buffer of the whole clip's features [B, C, T', h, w], less the one of a chunk's (`chunk` frames as a
    # batch) that the image tile estimate already counts (binding at configs/wan.yaml's calibration sizes: its blend + tile)
    feats = per_frame * max(0, batch * latent_frames - chunk)
    o = default_overlap(tile, overlap) // f * f
    th, tw = min(tile + o, height), min(tile + o, width)
    peak = memory.estimate_tile_peak(model, "encode", tile, chunk, mode="fast", height=height, width=width, **kw)
    top_level = past_bytes(top, th, tw, batch, elem, seen)
    return peak + encoder_cache_bytes(model, height, width, batch, elem, tile=tile + o) + top_level + clip + feats


def plan_video_encode(model: WanVAE, frames: int, height: int, width: int, tiling: Tiling, batch: int = 1) -> Choice:
    """Untiled ("off") or fast tiles of some edge to encode `frames` frames of height x width px within the tiling's budget.

    `--tile exact` is read as fast (no exact tiles for a causal video). A given tile size is used as
    is; else the budget must hold `video_encode_need`.
    """
    if tiling.mode == "off":
        return Choice("off", None, 1)
    if tiling.tile_size is not None and tiling.mode != "auto":
        return Choice("fast", tiling.tile_size, 1)
    f = int(model.downscale)
    t, height, width = _padded(frames, height, width, f, int(model.time_downscale))
    device = loaded_weight(model).device
    dtype = loaded_weight(model).dtype  # sized in the weights' dtype: the job returns freed memory to the OS (memory.return_freed_memory)
    budget = memory.budget_for(model, tiling.budget, device)

    def need(tile: int | None) -> int:
        return video_encode_need(model, t, height, width, dtype, tile, tiling.overlap, batch, device)

    if need(None) <= budget:
        return Choice("off", None, 1) if tiling.mode == "auto" else Choice("fast", max(height, width), 1)
    step = f * memory.TILE_STEP
    tile = memory.largest_tile(lambda s: need(s) <= budget, height, width, step)
    if tile is None:
        raise MemoryBudgetError(
            f"{memory.format_bytes(budget)} is too small to encode {t} frames of {width}x{height}: the smallest tile ({step} px, "
            f"fast mode, with its causal caches, the clip and the latent features) needs {memory.format_bytes(need(step), round_up=True)}"
        )
    return Choice("fast", tile, 1)


def _out_channels(block: nn.Module) -> int:
    """Output channels of the last conv in `block`."""
    convs = [m for m in block.modules() if isinstance(m, nn.Conv3d | nn.Conv2d)]
    return int(convs[-1].out_channels)


def _run(blocks: Sequence[nn.Module], x: torch.Tensor, cache: FrameCache) -> torch.Tensor:
    for block in blocks:
        x = block(x, cache)
    return x


def encode_video_fast(model: WanVAE, x: torch.Tensor, *, tile_size: int, overlap: int | None = None) -> torch.Tensor:
    """Video [B, 3, T, H, W] in [-1, 1] (T = 1 + 4k, H and W multiples of the downscale) -> moments [B, 2z, T', H/f, W/f], tiled.

    Tiles of `tile_size` image px (rounded down to the downscale) plus `overlap` (default a quarter) shared with each neighbour.
    """
    enc, f = model.encoder, int(model.downscale)
    b, _, frames, height, width = x.shape
    if x.ndim != 5 or (frames - 1) % CHUNK or height % f or width % f:
        raise InputError(f"a tiled Wan encode takes [B, 3, 1 + {CHUNK}k, H, W] with H and W multiples of {f}; got {list(x.shape)}")
    t = max(f, tile_size // f * f)
    o = max(0, default_overlap(tile_size, overlap) // f * f)
    h, w = height // f, width // f
    rows, cols = tile_spans(height, h, t + o, o, f, 1 / f), tile_spans(width, w, t + o, o, f, 1 / f)
    chunks = [(0, 1), *((i, i + CHUNK) for i in range(1, frames, CHUNK))]
    latent_frames = 1 + (frames - 1) // int(model.time_downscale)
    acc: torch.Tensor | None = None
    total = torch.zeros(h, w, dtype=torch.float32, device=x.device)
    spans: list[tuple[int, int]] = []  # latent frames of each chunk at the cut
    for r, c in product(rows, cols):
        weight = (r.weight[:, None] * c.weight[None, :]).to(x.device)  # [h', w']
        total[r.olo : r.ohi, c.olo : c.ohi] += weight
        cache, done, spans = FrameCache(), 0, []
        for lo, hi in chunks:
            y = _run(_high(enc), x[:, :, lo:hi, r.lo : r.hi, c.lo : c.hi], cache)  # [B, C, n, h', w']
            if y.shape[3:] != (r.ohi - r.olo, c.ohi - c.olo):
                raise RuntimeError(f"tiling bug: tile output {tuple(y.shape[3:])} != {(r.ohi - r.olo, c.ohi - c.olo)}")
            if acc is None:
                acc = torch.zeros(b, y.shape[1], latent_frames, h, w, dtype=torch.float32, device=x.device)  # [B, C, T', h, w]
            acc[:, :, done : done + y.shape[2], r.olo : r.ohi, c.olo : c.ohi] += y.float() * weight
            spans.append((done, done + y.shape[2]))
            done += y.shape[2]
        del cache
    if acc is None:
        raise RuntimeError("tiling bug: no tiles")
    feats = acc.div_(total).to(x.dtype)  # [B, C, T', h, w]
    del acc
    cache, out = FrameCache(), []
    for lo, hi in spans:
        z = _run(_low(enc), feats[:, :, lo:hi], cache)  # [B, C, n, h, w]: exact, incl. the per-frame attention
        out.append(model.conv1(enc.head[2](enc.head[1](enc.head[0](z)), cache)))  # [B, 2z, n, h, w]
    return torch.cat(out, dim=2)  # [B, 2z, T', h, w]
