"""Tiled encode and decode as pure functions over a model: exact (equal to untiled), fast, and auto.

`decode(model, z, tile="auto")` / `encode(model, x, tile="auto")` run untiled when the memory
planner's estimate fits the budget (`max_memory`, default what is free), else tiled: exact mode
when its estimate fits, else fast mode. On an actual out-of-memory they retry the failed chunk of
the batch with tiles half the size, down to the smallest tile, and then raise MemoryBudgetError.
`model` is an AutoencodingEngine (or a `vaetool.api.Vae`); nothing is stored on its modules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from vaetool import memory
from vaetool.errors import InputError, MemoryBudgetError
from vaetool.nn.temporal import VideoDecoder
from vaetool.tiling.exact import clip_frames, decode_exact, encode_exact
from vaetool.tiling.fast import decode_fast, encode_fast

__all__ = ["MODES", "decode", "decode_exact", "decode_fast", "encode", "encode_exact", "encode_fast"]

Runner = Callable[[torch.nn.Module, torch.Tensor, int | None, dict[str, Any]], torch.Tensor]


def _untiled_decode(model: torch.nn.Module, z: torch.Tensor, tile: int | None, kw: dict[str, Any]) -> torch.Tensor:
    return model.decode(z, **({} if kw.get("timesteps") is None else {"timesteps": kw["timesteps"]}))


def _untiled_encode(model: torch.nn.Module, x: torch.Tensor, tile: int | None, kw: dict[str, Any]) -> torch.Tensor:
    return model.encode_moments(x)


def _storage(model: torch.nn.Module) -> torch.device | None:
    """Exact mode keeps its full-size activations in host memory when the model is on an accelerator."""
    dev = next(model.parameters()).device
    return None if dev.type == "cpu" else torch.device("cpu")


RUNNERS: dict[tuple[str, str], Runner] = {
    ("decode", "off"): _untiled_decode,
    ("decode", "exact"): lambda m, z, t, kw: decode_exact(m, z, t, timesteps=kw.get("timesteps"), storage=_storage(m)),
    ("decode", "fast"): lambda m, z, t, kw: decode_fast(m, z, t, kw.get("overlap"), timesteps=kw.get("timesteps")),
    ("encode", "off"): _untiled_encode,
    ("encode", "exact"): lambda m, x, t, kw: encode_exact(m, x, t, storage=_storage(m)),
    ("encode", "fast"): lambda m, x, t, kw: encode_fast(m, x, t, kw.get("overlap")),
}
MODES: tuple[str, ...] = ("auto", "off", "exact", "fast")


def _is_oom(err: BaseException) -> bool:
    """torch's out-of-memory error, or the CPU allocator's failure (a plain RuntimeError)."""
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "can't allocate memory" in str(err)
    )


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _choose(
    model: torch.nn.Module, op: str, mode: str, shape: tuple[int, int, int], dtype: torch.dtype,
    max_memory: int | str | None, device: torch.device,
) -> tuple[str, int | None, int]:
    """(mode, tile, batch size) from the planner: untiled if it fits, else exact if it fits, else fast."""
    batch, height, width = shape
    *first, last = ("exact", "fast") if mode == "auto" else (mode,)
    for tiled in first:  # exact when it fits; the last candidate's budget error is the one raised
        try:
            p = memory.plan(model, op, height, width, batch, dtype, max_memory, device, mode=tiled)  # type: ignore[arg-type]
            break
        except MemoryBudgetError:
            continue
    else:
        tiled = last
        p = memory.plan(model, op, height, width, batch, dtype, max_memory, device, mode=tiled)  # type: ignore[arg-type]
    if p.fits_untiled:
        return ("off" if mode == "auto" else mode), (None if mode == "auto" else max(height, width)), p.batch_size
    return tiled, p.tile, p.batch_size


def _run(
    model: torch.nn.Module, op: str, data: torch.Tensor, *, mode: str, tile_size: int | None,
    max_memory: int | str | None, frames: int, kw: dict[str, Any],
) -> torch.Tensor:
    """Plan, then run chunk by chunk (whole clips), halving the tile of a chunk that runs out of memory."""
    if mode not in MODES:
        raise InputError(f"unknown tiling mode {mode!r}; choose one of {', '.join(MODES)}")
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    data = data.to(device, dtype)
    downscale = 2 ** (model.encoder.num_resolutions - 1)
    scale = downscale if op == "decode" else 1
    height, width = data.shape[2] * scale, data.shape[3] * scale
    min_tile = downscale * memory.TILE_STEP
    if mode == "off" or (mode != "auto" and tile_size is not None):
        chosen, tile, batch = mode, tile_size, data.shape[0]
    else:
        chosen, tile, batch = _choose(model, op, mode, (data.shape[0], height, width), dtype, max_memory, device)
    batch = max(frames, batch // frames * frames)
    outputs = []
    for chunk in torch.split(data, batch):
        chunk_mode, chunk_tile = chosen, tile
        while True:
            try:
                outputs.append(RUNNERS[(op, chunk_mode)](model, chunk, chunk_tile, kw))
                break
            except RuntimeError as err:  # torch.OutOfMemoryError is a RuntimeError; only out-of-memory is retried
                if not _is_oom(err):
                    raise
                _release(device)
                if chunk_tile is not None and chunk_tile <= min_tile:
                    need = memory.estimate_tile_peak(model, op, min_tile, chunk.shape[0], dtype, "fast",  # type: ignore[arg-type]
                                                     height=height, width=width, device=device)
                    raise MemoryBudgetError(
                        f"out of memory to {op} {width}x{height} images even with the smallest tile "
                        f"({min_tile} px); it needs about {memory.format_bytes(need, round_up=True)} free"
                    ) from None
                if chunk_mode == "off":  # untiled did not fit after all: tile at half the image
                    chunk_mode = "exact" if mode == "auto" else "fast"
                    chunk_tile = max(height, width)
                chunk_tile = max(min_tile, chunk_tile // 2 // min_tile * min_tile)
    return torch.cat(outputs)


@torch.inference_mode()
def decode(
    model: torch.nn.Module, z: torch.Tensor, *, tile: str = "auto", tile_size: int | None = None,
    max_memory: int | str | None = None, overlap: int | None = None, timesteps: int | None = None,
) -> torch.Tensor:
    """Latent [B*T, z, h, w] -> image [B*T, 3, h*f, w*f] untiled, exact- or fast-tiled within `max_memory`."""
    model = getattr(model, "model", model)
    frames = clip_frames(z.shape[0], timesteps, model)
    kw = {"overlap": overlap, "timesteps": frames if isinstance(model.decoder, VideoDecoder) else None}
    return _run(model, "decode", z, mode=tile, tile_size=tile_size, max_memory=max_memory, frames=frames, kw=kw)


@torch.inference_mode()
def encode(
    model: torch.nn.Module, x: torch.Tensor, *, tile: str = "auto", tile_size: int | None = None,
    max_memory: int | str | None = None, overlap: int | None = None,
) -> torch.Tensor:
    """Image [B, 3, H, W] in [-1, 1] -> moments [B, 2z, H/f, W/f] untiled, exact- or fast-tiled within `max_memory`."""
    model = getattr(model, "model", model)
    return _run(model, "encode", x, mode=tile, tile_size=tile_size, max_memory=max_memory, frames=1,
                kw={"overlap": overlap})
