"""Wan 2.1 / Qwen-Image video decode within a budget: spatial tiles through the causal cache, in two orders.

The causal decoder already streams time (`WanVAE.decode_video_frames`: each latent frame through
one FrameCache). Fast tiles split space too. The latent-resolution part (`Decoder3d.low`: conv1,
the middle block with its per-frame attention, the first level) runs exactly on whole latent
frames through one cache; the rest (`Decoder3d.high`, convs only: Wan's RMS norm is per pixel, so
nothing else is global) runs on overlapping latent tiles, each carrying its own FrameCache from
frame to frame, and the tiles are cross-faded with the image fast mode's windows and cosine ramps
(vaetool.tiling.fast.tile_spans).

- frame-major (`decode_video_fast`, order "frames"): for each latent frame, every tile; all the
  tiles' caches are alive at once (about two frames per causal conv, over all tiles: they do not
  shrink with the tile), plus one chunk's float32 blend buffer. Streams: nothing grows with the clip.
- tile-major (`decode_video_tiles`, order "tiles"): for each tile, every latent frame; one tile's
  cache at a time, but `low` of the whole clip and a float32 accumulator of the whole clip's
  frames [B, 3, T, H, W] are held until the last tile. The same tiles, windows and sums per pixel
  in the same order as frame-major, so the same output.

vaetool.tiling.causal_plan picks untiled, an order and the tile edge for a budget.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import product

import torch

from vaetool.nn.causal import FrameCache
from vaetool.nn.wan import WanVAE
from vaetool.tiling.fast import TileSpan, default_overlap, tile_spans

__all__ = ["ORDERS", "decode_video_fast", "decode_video_tiles", "latent_tile", "video_tiles"]

ORDERS = ("frames", "tiles")  # frame-major, tile-major


def latent_tile(tile: int, overlap: int | None, f: int) -> tuple[int, int]:
    """(tile, overlap) in latent px for a tile edge and overlap in image px."""
    return max(1, tile // f), max(0, default_overlap(tile, overlap) // f)


def video_tiles(h: int, w: int, f: int, tile: int, overlap: int | None) -> list[tuple[TileSpan, TileSpan]]:
    """The (row, column) spans of the tiles over a latent frame of h x w, in decode order."""
    t, o = latent_tile(tile, overlap, f)
    return list(product(tile_spans(h, h * f, t + o, o, 1, f), tile_spans(w, w * f, t + o, o, 1, f)))


def _windows(
    tiles: list[tuple[TileSpan, TileSpan]], height: int, width: int, device: torch.device
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each tile's blend window [h', w'] and their sum over the frame [H, W], float32."""
    weights = [(r.weight[:, None] * c.weight[None, :]).to(device) for r, c in tiles]  # [h', w'] each
    total = torch.zeros(height, width, dtype=torch.float32, device=device)
    for (r, c), weight in zip(tiles, weights, strict=True):
        total[r.olo : r.ohi, c.olo : c.ohi] += weight
    return weights, total


def decode_video_fast(model: WanVAE, z: torch.Tensor, *, tile_size: int, overlap: int | None = None) -> Iterator[torch.Tensor]:
    """Latent video [B, z, t, h, w] -> per latent frame, its frames [B, 3, 1 or time_downscale, H, W] in [-1, 1], tiled frame-major.

    Tiles of `tile_size` image px plus `overlap` (default a quarter) shared with each neighbour.
    """
    dec, f = model.decoder, int(model.downscale)
    h, w = z.shape[3:]
    tiles = video_tiles(h, w, f, tile_size, overlap)
    weights, total = _windows(tiles, h * f, w * f, z.device)
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


def decode_video_tiles(model: WanVAE, z: torch.Tensor, *, tile_size: int, overlap: int | None = None) -> Iterator[torch.Tensor]:
    """`decode_video_fast`'s output, computed tile-major: each tile runs the whole clip through its own cache, then the chunks go out.

    Holds the whole clip's `low` [B, C, t, h, w] and a float32 accumulator [B, 3, T, H, W]; only one
    tile's FrameCache is alive at a time.
    """
    dec, f, td = model.decoder, int(model.downscale), int(model.time_downscale)
    b, _, t, h, w = z.shape
    tiles = video_tiles(h, w, f, tile_size, overlap)
    weights, total = _windows(tiles, h * f, w * f, z.device)
    x, low_cache = model.conv2(z), FrameCache()  # [B, z, t, h, w]
    low = torch.cat([dec.low(x[:, :, i : i + 1], low_cache) for i in range(t)], dim=2)  # [B, C, t, h, w], exact
    del x, low_cache
    counts = [1] + [td] * (t - 1)  # frames per latent frame
    acc = torch.zeros(b, 3, sum(counts), h * f, w * f, dtype=torch.float32, device=z.device)  # [B, 3, T, H, W]
    for (r, c), weight in zip(tiles, weights, strict=True):
        cache, k = FrameCache(), 0
        for i in range(t):
            y = dec.high(low[:, :, i : i + 1, r.lo : r.hi, c.lo : c.hi], cache)  # [B, 3, n, h', w']
            acc[:, :, k : k + y.shape[2], r.olo : r.ohi, c.olo : c.ohi] += y.float() * weight
            k += y.shape[2]
        del cache
    del low
    k = 0
    for n in counts:
        yield (acc[:, :, k : k + n] / total).to(z.dtype).clamp_(-1.0, 1.0)  # [B, 3, n, H, W]
        k += n
