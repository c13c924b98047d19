"""Chunked temporal decoding with overlap blending, as pure functions over a decode callable.

The SVD temporal decoder mixes information across the frames of one call (`timesteps` frames),
so a long video is decoded a chunk at a time. Upstream (diffusers' `decode_chunk_size`) cuts
the video into disjoint chunks; each chunk's first and last frames then see zero-padded time
and the video jumps at every chunk boundary. Here consecutive chunks share `overlap` frames and
are cross-faded linearly over them, so the jump is spread out and averaged away. With
overlap 0 the chunks are exactly upstream's (the last one may be shorter).

Frames are finished chunk by chunk (`iter_decode_chunks` yields them as soon as no later chunk
contributes), so a long video never needs all decoded frames in memory at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch

__all__ = ["ChunkDecodeFn", "FrameSpan", "blend_weights", "chunk_spans", "decode_chunks", "iter_decode_chunks", "validate_chunking"]

# latents [L, C, h, w] of L consecutive frames, L -> images [L, 3, H, W]
ChunkDecodeFn = Callable[[torch.Tensor, int], torch.Tensor]


class FrameSpan(NamedTuple):
    """Frames [start, stop) of one chunk."""

    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


def validate_chunking(chunk_frames: int, overlap: int) -> None:
    """ValueError unless 1 <= chunk_frames and 0 <= overlap <= chunk_frames // 2."""
    if chunk_frames < 1:
        raise ValueError(f"chunk_frames must be at least 1, got {chunk_frames}")
    if overlap < 0 or 2 * overlap > chunk_frames:
        raise ValueError(f"overlap must be between 0 and half of chunk_frames ({chunk_frames // 2}), got {overlap}")


def chunk_spans(frames: int, chunk_frames: int, overlap: int = 0) -> list[FrameSpan]:
    """Chunks of `chunk_frames` frames, each starting `chunk_frames - overlap` after the previous.

    The last chunk ends at `frames` and may be shorter, but always reaches more than `overlap`
    frames past the previous one. With overlap 0 these are upstream's decode_chunk_size chunks.
    """
    validate_chunking(chunk_frames, overlap)
    if frames < 1:
        return []
    stride = chunk_frames - overlap
    starts = [0]
    while starts[-1] + chunk_frames < frames:
        starts.append(starts[-1] + stride)
    return [FrameSpan(s, min(s + chunk_frames, frames)) for s in starts]


def blend_weights(length: int, ramp_in: int, ramp_out: int) -> torch.Tensor:
    """Per-frame weights [length] of a chunk: linear ramps over its first `ramp_in` and last `ramp_out` frames.

    Over an overlap of n frames the incoming ramp is (j + 1) / (n + 1) and the outgoing one its
    complement, so the two chunks' weights sum to 1 on every shared frame and never reach 0 or 1.
    """
    w = torch.ones(length, dtype=torch.float32)
    ramp_in_w = torch.arange(1, ramp_in + 1, dtype=torch.float32) / (ramp_in + 1)  # [ramp_in]
    ramp_out_w = 1.0 - torch.arange(1, ramp_out + 1, dtype=torch.float32) / (ramp_out + 1)  # [ramp_out]
    w[:ramp_in] = torch.minimum(w[:ramp_in], ramp_in_w)
    if ramp_out:
        w[length - ramp_out :] = torch.minimum(w[length - ramp_out :], ramp_out_w)
    return w


def iter_decode_chunks(
    decode: ChunkDecodeFn, latents: torch.Tensor, chunk_frames: int, overlap: int = 0
) -> Iterator[tuple[int, torch.Tensor]]:
    """Decode latents [T, C, h, w] chunk by chunk; yields (first frame index, finished frames [n, 3, H, W] float32).

    `decode(z, L)` decodes L consecutive frames as one clip. Frames shared by two chunks are the
    weighted mean of both decodes (weights from `blend_weights`); every frame is yielded once, in order.
    """
    spans = chunk_spans(latents.shape[0], chunk_frames, overlap)
    carry_num: torch.Tensor | None = None  # [overlap, 3, H, W]: weighted sum so far of frames the next chunk shares
    carry_den: torch.Tensor | None = None  # [overlap]
    for k, span in enumerate(spans):
        last = k == len(spans) - 1
        images = decode(latents[span.start : span.stop], len(span)).float()  # [L, 3, H, W]
        if images.shape[0] != len(span):
            raise ValueError(f"decode returned {images.shape[0]} frames for a chunk of {len(span)}")
        shared_in = 0 if carry_num is None else carry_num.shape[0]
        shared_out = 0 if last else overlap
        w = blend_weights(len(span), shared_in, shared_out).to(images.device)  # [L]
        num = images * w[:, None, None, None]  # [L, 3, H, W]
        den = w.clone()
        if carry_num is not None and carry_den is not None:
            num[:shared_in] += carry_num.to(num.device)
            den[:shared_in] += carry_den.to(den.device)
        keep = len(span) - shared_out
        yield span.start, num[:keep] / den[:keep, None, None, None]
        carry_num, carry_den = (num[keep:], den[keep:]) if shared_out else (None, None)


def decode_chunks(decode: ChunkDecodeFn, latents: torch.Tensor, chunk_frames: int, overlap: int = 0) -> torch.Tensor:
    """All frames [T, 3, H, W] float32 of `iter_decode_chunks`, concatenated."""
    parts = [frames for _, frames in iter_decode_chunks(decode, latents, chunk_frames, overlap)]
    if not parts:
        raise ValueError("no frames to decode")
    return torch.cat(parts)
