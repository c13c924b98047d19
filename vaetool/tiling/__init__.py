"""The one front door for running an autoencoder within a memory budget: `encode` and `decode`.

    tiling.decode(model, z, Tiling(mode="auto", max_memory="2GiB"))  # [B, C, h, w] -> [B, 3, H, W]
    tiling.encode(model, x, Tiling(mode="fast", tile_size=256))      # [B, 3, H, W] -> moments [B, 2C, h, w]

Every caller (the commands, `vaetool.api.Vae`, video) goes through these two functions. `choose`
asks the memory planner once per call: `auto` runs untiled when the estimate fits the budget
(`max_memory`, default what the device has free), else exact tiles (equal to untiled) when they
fit, else fast tiles (fixed GroupNorm statistics, blended; see tiling.fast.ERROR_DB), else it
raises MemoryBudgetError naming the smallest budget that works. `exact`/`fast` tile in that mode
(the planner picks the tile size unless `tile_size` is given); `off` never tiles. A batch is run in
the chunks the planner allows (whole clips for a video decoder). An actual out-of-memory at run
time retries the failed chunk with tiles half the size, down to the smallest tile. With a budget,
attention is capped by it too. `model` is an AutoencodingEngine or a `vaetool.api.Vae`; nothing is
stored on its modules.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from vaetool import memory
from vaetool.errors import ConfigError, MemoryBudgetError
from vaetool.nn import attention
from vaetool.nn.temporal import VideoDecoder
from vaetool.nn.util import loaded_weight
from vaetool.tiling.archs import PROGRAMS
from vaetool.tiling.exact import clip_frames, decode_exact, encode_exact
from vaetool.tiling.fast import decode_fast, encode_fast

__all__ = [
    "MODES", "RUNNERS", "Choice", "Tiling", "choose", "decode", "decode_exact", "decode_fast", "encode", "encode_exact",
    "encode_fast",
]  # fmt: skip

MODES: tuple[str, ...] = ("auto", "off", "exact", "fast")
MIN_TILE_SIZE = 16  # image pixels

# (direction, mode) -> runner(model, x, tile_size, overlap, timesteps); a table so tests can stand in for one
Runner = Callable[[torch.nn.Module, torch.Tensor, "int | None", "int | None", "int | None"], torch.Tensor]
RUNNERS: dict[tuple[str, str], Runner] = {
    ("decode", "off"): lambda m, z, size, ov, t: m.decode(z, **({} if t is None else {"timesteps": t})),
    ("decode", "exact"): lambda m, z, size, ov, t: decode_exact(m, z, tile_size=size, timesteps=t),
    ("decode", "fast"): lambda m, z, size, ov, t: decode_fast(m, z, tile_size=size, overlap=ov, timesteps=t),
    ("encode", "off"): lambda m, x, size, ov, t: m.encode_moments(x),
    ("encode", "exact"): lambda m, x, size, ov, t: encode_exact(m, x, tile_size=size),
    ("encode", "fast"): lambda m, x, size, ov, t: encode_fast(m, x, tile_size=size, overlap=ov),
}


@dataclass(frozen=True)
class Tiling:
    """How to fit a model call in memory: the mode, the tile edge, the budget, the fast-mode overlap."""

    mode: str = "auto"  # auto | off | exact | fast
    tile_size: int | None = None  # tile edge in image pixels (None: the planner's choice)
    max_memory: int | str | None = None  # budget, e.g. "2GiB" (None: what the device has free)
    overlap: int | None = None  # fast mode: image pixels shared by neighbouring tiles (None: a quarter tile)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"unknown tiling mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.tile_size is not None and self.tile_size < MIN_TILE_SIZE:
            raise ConfigError(f"tile size {self.tile_size} is below the smallest, {MIN_TILE_SIZE} px")
        if self.overlap is not None and self.overlap < 0:
            raise ConfigError(f"tile overlap {self.overlap} must not be negative")
        if self.max_memory is not None:
            self.budget  # noqa: B018 - parse now, so a bad size is a ConfigError before any work

    @property
    def budget(self) -> int | None:
        """The memory budget in bytes (None: what the device has free)."""
        if self.max_memory is None:
            return None
        try:
            return memory.parse_memory(self.max_memory)
        except ValueError as err:
            raise ConfigError(f"--max-memory: {err}") from None


@dataclass(frozen=True)
class Choice:
    """What runs for one call: the mode (off, exact or fast), the tile edge, and items per model call."""

    mode: str
    tile_size: int | None
    batch_size: int


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "model", model)


def downscale(model: torch.nn.Module) -> int:
    """Spatial factor between image and latent of an AutoencodingEngine-like model."""
    return int(_unwrap(model).downscale)


def choose(
    model: torch.nn.Module, direction: str, batch: int, height: int, width: int, tiling: Tiling, *, frames: int = 1
) -> Choice:
    """The planner's choice for `batch` images of height x width pixels: untiled if it fits (auto), else exact, else fast.

    `frames`: items that must run together (a temporal decoder's clip); they are tiled rather than split.
    """
    model = _unwrap(model)
    if tiling.mode == "off":
        return Choice("off", None, batch)
    if not plannable(model):  # a family without a memory estimate or tile program yet: untiled only
        if tiling.mode == "auto":
            return Choice("off", None, batch)
        raise ConfigError(f"--tile {tiling.mode} is not available for {type(model).__name__} models yet; use --tile auto or off")
    if tiling.mode != "auto" and tiling.tile_size is not None:
        return Choice(tiling.mode, tiling.tile_size, batch)
    weight = loaded_weight(model)
    *first, last = ("exact", "fast") if tiling.mode == "auto" else (tiling.mode,)
    plan = None
    for mode in first:  # exact when it fits; the last candidate's budget error is the one raised
        with contextlib.suppress(MemoryBudgetError):
            plan = memory.plan(model, direction, height, width, batch, weight.dtype, tiling.budget, weight.device, mode=mode,  # type: ignore[arg-type]
                               min_batch=frames)
            break
    if plan is None:
        mode = last
        plan = memory.plan(model, direction, height, width, batch, weight.dtype, tiling.budget, weight.device, mode=mode,  # type: ignore[arg-type]
                           min_batch=frames)
    if plan.fits_untiled:
        return Choice("off", None, plan.batch_size) if tiling.mode == "auto" else Choice(mode, max(height, width), plan.batch_size)
    return Choice(mode, plan.tile, plan.batch_size)


def plannable(model: torch.nn.Module) -> bool:
    """Whether the memory planner and the tiled programs know this model's architecture (the LDM coders, Wan, Flux.2, TAESD)."""
    from vaetool.nn.coders import Decoder, Encoder

    model = _unwrap(model)
    if type(model) in PROGRAMS:  # vaetool.tiling.archs (and their estimates in vaetool.memory_archs)
        return True
    return type(getattr(model, "encoder", None)) is Encoder and type(getattr(model, "decoder", None)) in (Decoder, VideoDecoder)


def _is_oom(err: BaseException) -> bool:
    """torch's out-of-memory error, or the CPU allocator's failure (a plain RuntimeError)."""
    return isinstance(err, torch.OutOfMemoryError) or (isinstance(err, RuntimeError) and "can't allocate memory" in str(err))


@contextlib.contextmanager
def _attention_cap(tiling: Tiling) -> Iterator[None]:
    """With a budget: attention treats at most the budget as free (the default backend becomes `auto`, which then picks)."""
    if tiling.budget is None:
        yield
        return
    with contextlib.ExitStack() as stack:
        stack.enter_context(attention.limit_attention_memory(tiling.budget))
        if attention.current_attention() == "sdpa":  # the default: let `auto` fall back when the scores would not fit
            stack.enter_context(attention.use_attention("auto"))
        yield


def _run(model: torch.nn.Module, direction: str, data: torch.Tensor, tiling: Tiling, frames: int, timesteps: int | None) -> torch.Tensor:
    """Plan, then run chunk by chunk (whole clips), halving the tile of a chunk that runs out of memory."""
    weight = loaded_weight(model)
    data = data.to(weight.device, weight.dtype)
    f = downscale(model)
    scale = f if direction == "decode" else 1
    height, width = data.shape[2] * scale, data.shape[3] * scale
    min_tile = f * memory.TILE_STEP
    choice = choose(model, direction, data.shape[0], height, width, tiling, frames=frames)
    batch = max(frames, choice.batch_size // frames * frames)
    outputs = []
    with _attention_cap(tiling):
        for chunk in torch.split(data, batch):
            mode, size = choice.mode, choice.tile_size
            while True:
                try:
                    outputs.append(RUNNERS[(direction, mode)](model, chunk, size, tiling.overlap, timesteps))
                    break
                except RuntimeError as err:  # torch.OutOfMemoryError is a RuntimeError; only out-of-memory is retried
                    if not _is_oom(err):
                        raise
                    if weight.device.type == "cuda":
                        torch.cuda.empty_cache()
                    if tiling.mode == "off" or (size is not None and size <= min_tile):
                        need = memory.estimate_tile_peak(model, direction, min_tile, chunk.shape[0], weight.dtype, "fast",  # type: ignore[arg-type]
                                                         height=height, width=width, device=weight.device)
                        how = "untiled (--tile off)" if tiling.mode == "off" else f"even with the smallest tile ({min_tile} px)"
                        raise MemoryBudgetError(
                            f"out of memory to {direction} {width}x{height} images {how}; "
                            f"the smallest fast tile needs about {memory.format_bytes(need, round_up=True)} free"
                        ) from None
                    if mode == "off":  # untiled did not fit after all: tile at half the image
                        mode, size = "exact", max(height, width)
                    size = max(min_tile, int(size or min_tile) // 2 // min_tile * min_tile)
    return torch.cat(outputs)


@torch.inference_mode()
def decode(model: torch.nn.Module, z: torch.Tensor, tiling: Tiling | None = None, *, timesteps: int | None = None) -> torch.Tensor:
    """Raw latents [B*T, C, h, w] -> images [B*T, 3, h*f, w*f] (in the model's dtype), within the tiling's budget."""
    model = _unwrap(model)
    frames = clip_frames(z.shape[0], timesteps, model)
    temporal = frames if isinstance(model.decoder, VideoDecoder) else None
    return _run(model, "decode", z, tiling or Tiling(), frames, temporal)


@torch.inference_mode()
def encode(model: torch.nn.Module, x: torch.Tensor, tiling: Tiling | None = None) -> torch.Tensor:
    """Images [B, 3, H, W] in [-1, 1] -> moments [B, 2C, H/f, W/f] (mean, logvar), within the tiling's budget."""
    return _run(_unwrap(model), "encode", x, tiling or Tiling(), 1, None)
