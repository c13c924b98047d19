"""Wan 2.1 / Qwen-Image video decode within a budget: one latent frame at a time, in spatial tiles.

The causal decoder already streams time (`WanVAE.decode_video_frames`: each latent frame through
one FrameCache). Fast tiles split space too, frame-major: for each latent frame, the
latent-resolution part (`Decoder3d.low`: conv1, the middle block with its per-frame attention, the
first level) runs exactly on the whole latent frame through one cache; the rest (`Decoder3d.high`,
convs only: Wan's RMS norm is per pixel, so nothing else is global) runs on overlapping latent
tiles, each carrying its own FrameCache from frame to frame, and the tiles are cross-faded with
the image fast mode's windows and cosine ramps (vaetool.tiling.fast.tile_spans). Memory: one
chunk's working set for one tile, plus the caches (about two frames per causal conv, over all
tiles: they do not shrink with the tile), plus one chunk of output frames; none of it grows with
the clip's length.

`plan_video` picks untiled or the tile edge from the image estimate for one chunk
(`time_downscale` frames) plus the caches. Error against the untiled decode: docs/memory.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import product

import torch

from vaetool import memory
from vaetool.errors import MemoryBudgetError
from vaetool.nn.causal import CausalConv3d, FrameCache
from vaetool.nn.util import loaded_weight
from vaetool.nn.wan import Decoder3d, Resample, WanVAE
from vaetool.tiling import Choice, Tiling
from vaetool.tiling.fast import default_overlap, tile_spans

__all__ = ["cache_bytes", "decode_video_fast", "plan_video"]


def cache_bytes(decoder: Decoder3d, height: int, width: int, batch: int = 1, elem: int = 4) -> int:
    """Bytes the FrameCache holds decoding a latent of height x width latent px: each causal conv's past frames."""
    total, scale = 0, 1
    for block in (decoder.conv1, *decoder.middle, *decoder.upsamples, decoder.head):
        for m in block.modules():
            if isinstance(m, CausalConv3d) and m.time_pad:
                total += m.time_pad * m.in_channels * height * scale * width * scale  # [B, Cin, time_pad, h', w']
        if isinstance(block, Resample) and block.mode.startswith("up"):
            scale *= 2
    return total * batch * elem


def _latent_tile(tile: int, overlap: int | None, f: int) -> tuple[int, int]:
    """(tile, overlap) in latent px for a tile edge and overlap in image px."""
    return max(1, tile // f), max(0, default_overlap(tile, overlap) // f)


def _tiled_extent(n: int, tile: int, overlap: int | None, f: int) -> int:
    """Latent px along an axis of `n` that the tiles cover in all, overlaps counted twice."""
    t, o = _latent_tile(tile, overlap, f)
    return sum(s.hi - s.lo for s in tile_spans(n, n * f, t + o, o, 1, f))


def plan_video(model: WanVAE, latent_shape: tuple[int, ...], tiling: Tiling) -> Choice:
    """Untiled ("off") or fast tiles of some edge for a latent clip [B, C, t, h, w] within the tiling's budget.

    `--tile exact` is read as fast (no exact tiles for a causal video). A given tile size is used
    as is; else the budget less the caches must hold the image estimate of one chunk.
    """
    b, _, _, h, w = latent_shape
    f, chunk = int(model.downscale), int(model.time_downscale) * b
    if tiling.mode == "off":
        return Choice("off", None, 1)
    if tiling.tile_size is not None and tiling.mode != "auto":
        return Choice("fast", tiling.tile_size, 1)
    weight = loaded_weight(model)
    device = weight.device
    # Sized as fp32 whatever the weights: in bf16 the peak does not halve (bench/bench_wan_video.py, 33 frames at
    # 480x832: untiled 4.17 GiB, fast 256 px tiles 5.0 GiB, where a bf16-sized estimate promised 4 and 3 GiB).
    dtype = torch.float32
    elem = dtype.itemsize
    budget = memory.budget_for(model, tiling.budget, device)
    height, width = h * f, w * f
    kw = {"dtype": dtype, "device": device}
    untiled = memory.estimate_peak(model, "decode", height, width, chunk, **kw) + cache_bytes(model.decoder, h, w, b, elem)
    if untiled <= budget:
        return Choice("off", None, 1) if tiling.mode == "auto" else Choice("fast", max(height, width), 1)

    def need(tile: int) -> int:
        caches = cache_bytes(model.decoder, _tiled_extent(h, tile, tiling.overlap, f), _tiled_extent(w, tile, tiling.overlap, f), b, elem)
        peak = memory.estimate_tile_peak(model, "decode", tile, chunk, mode="fast", height=height, width=width, **kw)
        return peak + caches

    step = f * memory.TILE_STEP
    tiles = range(step, max(height, width) + step, step)
    fitting = [t for t in tiles if need(t) <= budget]
    if not fitting:
        raise MemoryBudgetError(
            f"{memory.format_bytes(budget)} is too small to decode a {width}x{height} video: the smallest tile ({step} px, "
            f"fast mode, with its causal caches) needs {memory.format_bytes(need(step), round_up=True)}"
        )
    return Choice("fast", fitting[-1], 1)


def decode_video_fast(model: WanVAE, z: torch.Tensor, *, tile_size: int, overlap: int | None = None) -> Iterator[torch.Tensor]:
    """Latent video [B, z, t, h, w] -> per latent frame, its frames [B, 3, 1 or time_downscale, H, W] in [-1, 1], tiled.

    Tiles of `tile_size` image px plus `overlap` (default a quarter) shared with each neighbour.
    """
    dec, f = model.decoder, int(model.downscale)
    h, w = z.shape[3:]
    t, o = _latent_tile(tile_size, overlap, f)
    rows = tile_spans(h, h * f, t + o, o, 1, f)
    cols = tile_spans(w, w * f, t + o, o, 1, f)
    tiles = list(product(rows, cols))
    weights = [(r.weight[:, None] * c.weight[None, :]).to(z.device) for r, c in tiles]  # [h', w'] each
    total = torch.zeros(h * f, w * f, dtype=torch.float32, device=z.device)
    for (r, c), weight in zip(tiles, weights, strict=True):
        total[r.olo : r.ohi, c.olo : c.ohi] += weight
    x = model.conv2(z)  # [B, z, t, h, w]: 1x1x1, latent-sized
    low_cache, caches = FrameCache(), [FrameCache() for _ in tiles]
    for i in range(z.shape[2]):
        low = dec.low(x[:, :, i : i + 1], low_cache)  # [B, C, 1, h, w]: exact, incl. the attention
        acc: torch.Tensor | None = None
        for ((r, c), weight), cache in zip(zip(tiles, weights, strict=True), caches, strict=True):
            y = dec.high(low[:, :, :, r.lo : r.hi, c.lo : c.hi], cache)  # [B, 3, T, h', w']
            if acc is None:
                acc = torch.zeros(*y.shape[:3], h * f, w * f, dtype=torch.float32, device=z.device)  # [B, 3, T, H, W]
            acc[..., r.olo : r.ohi, c.olo : c.ohi] += y.float() * weight
        if acc is None:
            raise RuntimeError("tiling bug: no tiles")
        yield (acc / total).to(z.dtype).clamp_(-1.0, 1.0)  # [B, 3, T, H, W]
