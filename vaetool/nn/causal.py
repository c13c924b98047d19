"""Causal 3D convolution over time, streamed chunk by chunk through a FrameCache.

A causal conv pads only the past: output frame t sees input frames t-k+1 .. t, with zeros before
the first frame. Run on a video in chunks (the Wan VAE encodes the first frame alone, then chunks
of four), each conv needs the last frames of the previous chunk: the FrameCache keeps, per layer,
the tail of everything that layer has seen, so chunked output equals the whole-sequence output.
One FrameCache belongs to one pass over one sequence; without one, a conv sees a single chunk.
A lone first frame (an image) meets only zeros in the past, so it runs as a 2D conv with the
kernel's last time tap: the same result for a third of the work.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class FrameCache:
    """Per layer: the last frames it has seen of the current sequence (and which layers ran once)."""

    def __init__(self) -> None:
        self._tails: dict[int, torch.Tensor] = {}
        self._seen: set[int] = set()

    def step(self, layer: nn.Module, x: torch.Tensor, keep: int) -> torch.Tensor | None:
        """The frames `layer` saw before `x` (at most `keep`, None at the start); remembers the new tail."""
        prev = self._tails.get(id(layer))
        stream = x if prev is None else torch.cat([prev, x], dim=2)  # [B, C, t', H, W]
        self._tails[id(layer)] = stream[:, :, -keep:].clone()  # a copy: the chunk itself may be freed
        return prev

    def first_visit(self, layer: nn.Module) -> bool:
        """True the first time `layer` asks during this sequence."""
        first = id(layer) not in self._seen
        self._seen.add(id(layer))
        return first


class CausalConv3d(nn.Conv3d):
    """Conv3d that zero-pads time on the past side only (2 * padding[0] frames) and pads space as usual."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
    ) -> None:
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=(0, ph, pw))
        self.time_pad = 2 * pt  # frames of past context the kernel reads

    def forward(self, x: torch.Tensor, cache: FrameCache | None = None) -> torch.Tensor:
        """x [B, C, T, H, W] -> [B, C', T', H', W']; with `cache`, the previous chunk's frames replace the zeros."""
        if self.time_pad == 0:
            return super().forward(x)
        prev = cache.step(self, x, self.time_pad) if cache is not None else None
        if prev is None and x.shape[2] == 1 and self.kernel_size[0] == self.time_pad + 1:
            return self.last_tap(x)
        if prev is not None:
            x = torch.cat([prev, x], dim=2)  # [B, C, t_prev + T, H, W]
        missing = self.time_pad - (0 if prev is None else prev.shape[2])
        if missing:
            x = F.pad(x, (0, 0, 0, 0, missing, 0))  # zeros before the first frame
        return super().forward(x)

    def last_tap(self, x: torch.Tensor) -> torch.Tensor:
        """One frame after nothing but zeros: only the kernel's last time tap sees data, so a 2D conv does it."""
        y = F.conv2d(x[:, :, 0], self.weight[:, :, -1], self.bias, self.stride[1:], self.padding[1:], self.dilation[1:], self.groups)
        return y[:, :, None]  # [B, C', 1, H', W']
