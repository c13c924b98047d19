"""Memory: free bytes per device, memory sizes, the tile/batch planner, and peak measurement.

The peak estimates themselves live in vaetool.memory_estimate (re-exported here): `estimate_peak`
for an untiled op, `estimate_tile_peak` for a tiled one. `plan` turns them into a batch size and a
tile size for a budget (`max_memory`, default: what is free, with a margin); a budget too small
for the smallest tile is a MemoryBudgetError naming the smallest budget that works.
"""

from __future__ import annotations

import ctypes
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vaetool.devices import FREE_MEMORY, free_memory
from vaetool.errors import MemoryBudgetError
from vaetool.memory_estimate import Direction, TileMode, architecture, estimate_peak, estimate_tile_peak

__all__ = [
    "FREE_MEMORY", "Plan", "architecture", "budget_for", "estimate_peak", "estimate_tile_peak", "format_bytes", "free_memory",
    "measure_peak", "parse_memory", "plan", "return_freed_memory",
]  # fmt: skip

DEFAULT_MARGIN = 0.8  # the default budget is this share of the free memory
TILE_STEP = 8  # tiles are multiples of downscale * TILE_STEP image pixels

_UNITS: dict[str, int] = {
    "": 1, "b": 1,
    "k": 2**10, "kib": 2**10, "kb": 10**3,
    "m": 2**20, "mib": 2**20, "mb": 10**6,
    "g": 2**30, "gib": 2**30, "gb": 10**9,
    "t": 2**40, "tib": 2**40, "tb": 10**12,
}  # fmt: skip
_MEMORY_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


# ---------------------------------------------------------------- free memory and sizes


def parse_memory(text: str | int) -> int:
    """Bytes from "2GiB", "512MB", "1.5G", "800000000": KiB/MiB/GiB and bare K/M/G are binary, KB/MB/GB decimal."""
    if isinstance(text, int) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        match = _MEMORY_RE.match(str(text))
        if match is None or match.group(2).lower() not in _UNITS:
            raise ValueError(f"cannot read memory size {text!r}: use a number with an optional unit, e.g. 2GiB, 512MB, 1.5G")
        value, unit = float(match.group(1)), match.group(2).lower()
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"memory size {text!r} must be more than 0 bytes")
    return size


def format_bytes(size: int, round_up: bool = False) -> str:
    """A short binary size (312 MiB, 1.5 GiB); `round_up` never shows less than `size`."""
    for unit, factor in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= factor:
            digits = 0 if size >= 10 * factor else 1
            value = math.ceil(size / factor * 10**digits) / 10**digits if round_up else size / factor
            return f"{value:.{digits}f} {unit}"
    return f"{size} B"


# ---------------------------------------------------------------- the planner


@dataclass(frozen=True)
class Plan:
    """How to run an op within a budget: untiled in batches of `batch_size`, or tiled with `tile` px tiles."""

    fits_untiled: bool
    tile: int | None
    batch_size: int
    estimate: int
    budget: int


def _resident_weights(model_or_cfg: Any, device: torch.device) -> int:
    """Bytes of the model's weights already on `device` (they are not free, but the estimate counts them)."""
    model = getattr(model_or_cfg, "model", model_or_cfg)
    if not isinstance(model, nn.Module):
        return 0
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type == device.type)


def budget_for(model_or_cfg: Any, max_memory: int | str | None, device: str | torch.device, margin: float = DEFAULT_MARGIN) -> int:
    """Bytes a call may use: `max_memory`, or `margin` of what `device` has free plus the model's weights already there."""
    if max_memory is not None:
        return parse_memory(max_memory)
    device = torch.device(device)
    return int(free_memory(device) * margin) + _resident_weights(model_or_cfg, device)


def largest(fits: Callable[[int], bool], candidates: list[int]) -> int | None:
    """Largest candidate (ascending list) for which the monotone `fits` holds, by bisection."""
    lo, hi, best = 0, len(candidates) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if fits(candidates[mid]):
            best, lo = candidates[mid], mid + 1
        else:
            hi = mid - 1
    return best


def largest_tile(fits: Callable[[int], bool], height: int, width: int, step: int) -> int | None:
    """Largest tile edge, a multiple of `step` up to the longer side rounded up, for which the monotone `fits` holds."""
    return largest(fits, list(range(step, math.ceil(max(height, width) / step) * step + 1, step)))


def plan(
    model_or_cfg: Any,
    op: Direction,
    height: int,
    width: int,
    batch: int = 1,
    dtype: torch.dtype = torch.float32,
    max_memory: int | str | None = None,
    device: str | torch.device = "cpu",
    *,
    mode: TileMode = "fast",
    margin: float = DEFAULT_MARGIN,
    attention: str | None = None,
    min_batch: int = 1,
) -> Plan:
    """Batch size and tile size (None: untiled) for an op within `max_memory` (default: free * margin).

    `min_batch`: items that must run in one call (the frames of a clip for a temporal decoder); when
    fewer fit untiled, they are tiled together.
    """
    min_batch = max(1, min(min_batch, batch))
    device = torch.device(device)
    arch = architecture(model_or_cfg)
    budget = budget_for(model_or_cfg, max_memory, device, margin)
    kw: dict[str, Any] = {"dtype": dtype, "device": device, "attention": attention}

    def untiled(b: int) -> int:
        return estimate_peak(arch, op, height, width, b, **kw)

    best_batch = largest(lambda b: untiled(b) <= budget, list(range(min_batch, batch + 1)))
    if best_batch is not None:
        return Plan(True, None, best_batch, untiled(best_batch), budget)

    step = arch.downscale * TILE_STEP

    def tiled(t: int, b: int = min_batch) -> int:
        return estimate_tile_peak(arch, op, t, b, mode=mode, height=height, width=width, **kw)

    tile = largest_tile(lambda t: tiled(t) <= budget, height, width, step)
    if tile is None:
        what = "max_memory" if max_memory is not None else f"the free memory budget ({margin:.0%} of free)"
        raise MemoryBudgetError(
            f"{what} {format_bytes(budget)} is too small to {op} {width}x{height} images: "
            f"the smallest tile ({step} px, {mode} mode) needs {format_bytes(tiled(step), round_up=True)}"
        )
    tile_batch = largest(lambda b: tiled(tile, b) <= budget, list(range(min_batch, batch + 1))) or min_batch
    return Plan(False, tile, tile_batch, tiled(tile, tile_batch), budget)


# ---------------------------------------------------------------- measuring


def _proc_status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


MMAP_THRESHOLD = 128 * 1024  # bytes: glibc serves larger allocations by mmap, so they leave the RSS when freed


def return_freed_memory() -> bool:
    """glibc: serve allocations over MMAP_THRESHOLD by mmap and trim the heap above it, for this whole process; False elsewhere.

    By default glibc raises its mmap threshold up to 32 MiB as large blocks are freed, and blocks
    below it come from a heap that keeps freed memory: a bf16 Wan video decode then held up to 2.5x
    its live tensors (docs/memory.md). The estimates are calibrated with this set.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD (fixed: no dynamic growth)
    libc.mallopt(-1, MMAP_THRESHOLD)  # M_TRIM_THRESHOLD
    libc.malloc_trim(0)
    return True


def measure_peak(fn: Callable[[], object], device: str | torch.device = "cpu") -> int:
    """Peak bytes `fn()` allocates above what is in use when it starts (CUDA: allocator stats; CPU: Linux peak RSS).

    On CPU this resets the kernel's RSS high-water mark (/proc/self/clear_refs) and sets glibc's mmap
    threshold to 128 KiB for the whole process, so freed tensors go back to the OS at once: use it
    in a process made for measuring (bench/calibrate_memory.py, tests run it in a subprocess).
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - start)
    if not Path("/proc/self/clear_refs").exists():
        raise RuntimeError("measuring CPU peak memory needs Linux (/proc/self/clear_refs)")
    return_freed_memory()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    start = _proc_status("VmRSS")
    fn()
    return _proc_status("VmHWM") - start
