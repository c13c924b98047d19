"""Devices: which one to run on, in which dtype, and how much memory it has free.

A leaf module (torch and psutil only), so that the attention backends, the memory planner and the
commands can all ask it without importing each other.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import psutil
import torch

from vaetool.errors import ConfigError

__all__ = ["AUTO_DTYPES", "DEVICE_NAMES", "DTYPE_NAMES", "FREE_MEMORY", "conv_memory_format", "cpu_has_native_bf16", "free_memory",
           "resolve_device", "resolve_dtype"]

DEVICE_NAMES = ("auto", "cpu", "cuda", "mps")
DTYPE_NAMES: dict[str, torch.dtype | None] = {"auto": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
AUTO_DTYPES: dict[str, torch.dtype] = {"cpu": torch.float32, "cuda": torch.float16, "mps": torch.float16}


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


# device name -> is it usable here; `auto` takes the first usable one in this order
AVAILABLE: dict[str, Callable[[], bool]] = {"cuda": torch.cuda.is_available, "mps": _mps_available, "cpu": lambda: True}


def resolve_device(name: str) -> torch.device:
    """The torch device for a device name (auto: cuda, then mps, then cpu; the local rank's GPU under torchrun)."""
    name = str(name).lower()
    if name not in DEVICE_NAMES:
        raise ConfigError(f"unknown device {name!r}; choose one of {', '.join(DEVICE_NAMES)}")
    if name == "auto":
        name = next(n for n, usable in AVAILABLE.items() if usable())
    elif not AVAILABLE[name]():
        raise ConfigError(f"--device {name} is not available on this machine")
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    return torch.device(name)


NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of x86 CPUs that compute in bf16 natively


@functools.cache
def cpuinfo_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU flags in `cpuinfo` include bf16 instructions (AMX or AVX-512 BF16; Linux x86)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bf16 natively, unless VAETOOL_CPU_BF16=0 keeps `--dtype auto` at fp32 on the CPU."""
    return os.environ.get("VAETOOL_CPU_BF16", "1") != "0" and cpuinfo_has_bf16()


def resolve_dtype(name: str, device: torch.device, *, cpu_bf16: bool = False) -> torch.dtype:
    """The torch dtype for a dtype name on `device`.

    auto: fp16 on accelerators; on the CPU fp32, or bf16 where `cpu_bf16` allows it (one-way jobs:
    encode, decode) and the CPU has native bf16 (measured: docs/speed.md).
    """
    name = str(name).lower()
    if name not in DTYPE_NAMES:
        raise ConfigError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPE_NAMES)}")
    if name == "auto" and device.type == "cpu" and cpu_bf16 and cpu_has_native_bf16():
        return torch.bfloat16
    return DTYPE_NAMES[name] or AUTO_DTYPES.get(device.type, torch.float32)


# (device type, dtype) -> the layout of 2-D convolution weights that runs fastest there, where it was measured
# (bench/bench_vs_diffusers.py, docs/speed.md): oneDNN's CPU convolutions with NHWC weights (the activations follow):
# bf16 ~1.3x; fp32 decode with the row-banded forward 7.6 s against 8.2 s at 512 px, fp32 encode 8-11 % faster (no
# oneDNN input reorders). Float rounding then depends on the thread count and the batch (~1e-6, as it does for the
# plain layout at SD size): same machine, threads and batch give the same bytes (docs/speed.md).
CONV_MEMORY_FORMATS: dict[tuple[str, torch.dtype], torch.memory_format] = {
    ("cpu", torch.bfloat16): torch.channels_last,
    ("cpu", torch.float32): torch.channels_last,
}


def conv_memory_format(device: torch.device, dtype: torch.dtype) -> torch.memory_format:
    """The memory format for Conv2d weights on `device` in `dtype` (channels_last where measured faster)."""
    return CONV_MEMORY_FORMATS.get((device.type, dtype), torch.contiguous_format)


def _free_cuda(device: torch.device) -> int:
    free, _total = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def _free_mps(device: torch.device) -> int:
    return int(torch.mps.recommended_max_memory() - torch.mps.current_allocated_memory())


def _free_cpu(device: torch.device) -> int:
    return int(psutil.virtual_memory().available)


FREE_MEMORY: dict[str, Callable[[torch.device], int]] = {"cuda": _free_cuda, "mps": _free_mps, "cpu": _free_cpu}


def free_memory(device: str | torch.device = "cpu") -> int:
    """Bytes free on `device` (CUDA: driver free + torch's cached blocks; MPS: recommended - allocated; CPU: available)."""
    device = torch.device(device)
    if device.type not in FREE_MEMORY:
        raise ValueError(f"cannot tell the free memory of device type {device.type!r}; known: {', '.join(FREE_MEMORY)}")
    return FREE_MEMORY[device.type](device)
