"""Small module and tensor helpers of ldm/sgm `diffusionmodules.util`."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, TypeVar

import torch
from torch import nn

T = TypeVar("T")

POOLS: dict[int, type[nn.Module]] = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of `module` in place; returns it."""
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    return module


def scale_module(module: nn.Module, scale: float) -> nn.Module:
    """Multiply every parameter of `module` by `scale` in place; returns it."""
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(scale)
    return module


def mean_flat(tensor: torch.Tensor) -> torch.Tensor:
    """The mean over every dimension but the batch: [B, ...] -> [B]."""
    return tensor.mean(dim=list(range(1, tensor.ndim)))


def avg_pool_nd(dims: int, *args: Any, **kwargs: Any) -> nn.Module:
    """nn.AvgPool1d / 2d / 3d for `dims` 1, 2 or 3, built with the remaining arguments."""
    if dims not in POOLS:
        raise ValueError(f"unsupported dimensions: {dims} (avg_pool_nd takes 1, 2 or 3)")
    return POOLS[dims](*args, **kwargs)


def noise_like(shape: tuple[int, ...], device: str | torch.device, repeat: bool = False) -> torch.Tensor:
    """Standard normal noise of `shape`; with `repeat` one sample repeated along the first dimension."""
    if repeat:
        return torch.randn((1, *shape[1:]), device=device).repeat(shape[0], *((1,) * (len(shape) - 1)))
    return torch.randn(shape, device=device)


def exists(val: object) -> bool:
    """`val is not None` (the attention code's idiom)."""
    return val is not None


def default(val: T | None, d: T) -> T:
    """`val`, or `d` when it is None."""
    return d if val is None else val


def uniq(arr: Iterable[T]) -> list[T]:
    """The distinct items of `arr` in first-seen order."""
    return list(dict.fromkeys(arr))


def max_neg_value(t: torch.Tensor) -> float:
    """The most negative finite value of `t`'s floating dtype (a mask fill that stays finite)."""
    return -torch.finfo(t.dtype).max


def init_(tensor: torch.Tensor) -> torch.Tensor:
    """Fill `tensor` in place from U(-1/sqrt(d), 1/sqrt(d)), d its last dimension; returns it."""
    std = 1 / math.sqrt(tensor.shape[-1])
    with torch.no_grad():
        return tensor.uniform_(-std, std)


def loaded_weight(model: nn.Module) -> torch.Tensor:
    """The model's first parameter that holds data (not on the meta device): its device and dtype are the model's."""
    return next(p for p in model.parameters() if not p.is_meta)
