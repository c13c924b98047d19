"""Attention backends behind one call: `attention(q, k, v)` on [B, heads, N, d] tensors.

Every call site (the VAE's AttnBlock, the transformer blocks) goes through `attention`, which
dispatches to the backend chosen with `use_attention(name)` (a context manager; thread- and
task-safe through a ContextVar) or the process default set by `set_default_attention(name)`.

Backends (all softmax(q k^T / sqrt(d)) v, no mask; q and k/v lengths may differ):
  basic    materialises the whole score matrix [B, H, Nq, Nk] (the reference);
  split    query slices sized from the device's free memory, retried with twice the slices on
           out-of-memory (the seeds' slice_attention / attention_split);
  chunked  sub-quadratic: query chunks x key chunks with a running max and sum (online softmax,
           Rabe & Staats 2021); its score chunk stays under CHUNK_BYTES whatever the input size;
  sdpa     torch's scaled_dot_product_attention on contiguous inputs (on CPU, non-contiguous inputs
           fall back to the math kernel, which materialises the scores);
  xformers xformers.ops.memory_efficient_attention (registered only when xformers is installed;
           CUDA tensors only);
  auto     per call: sdpa unless the score matrix would not fit the free memory, then AUTO_FALLBACK
           for the device.
`limit_attention_memory(bytes)` caps what split and auto treat as free (e.g. a user's max_memory).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from vaetool.devices import free_memory

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

SPLIT_FRACTION = 0.5  # a split slice may use at most this share of the free memory
SPLIT_MAX_SLICES = 4096  # retry limit: beyond this many slices (or one query per slice) re-raise
CHUNK_QUERY = 1024  # sub-quadratic query chunk (rows)
CHUNK_BYTES = 64 * 2**20  # sub-quadratic score-chunk working set bound
AUTO_FRACTION = 0.5  # auto picks sdpa while the score matrix fits this share of free memory
AUTO_FALLBACK: dict[str, str] = {"cuda": "split", "mps": "split", "cpu": "chunked"}
XFORMERS_DEVICES = frozenset({"cuda"})
UNAVAILABLE: dict[str, str] = {
    "xformers": "the xformers package is not installed; install it with: pip install 'vaetool[xformers]'",
}


def score_bytes(dtype: torch.dtype | int) -> int:
    """Bytes per score element basic attention holds at its peak (scaled scores + fp32 softmax, + casts).

    `dtype` may also be an element size in bytes.
    """
    elem = dtype if isinstance(dtype, int) else torch.finfo(dtype).bits // 8
    return 2 * max(elem, 4) + (elem if elem < 4 else 0)


def is_out_of_memory(err: BaseException) -> bool:
    """True for an accelerator OOM or a failed CPU allocation."""
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "can't allocate memory" in str(err)
    )


def attention_basic(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Materialise the whole score matrix (the reference every backend is tested against)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, H, Nq, Nk]
    probs = scores.float().softmax(dim=-1).to(v.dtype)
    return torch.matmul(probs, v)  # [B, H, Nq, d]


def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PyTorch's fused scaled_dot_product_attention on contiguous inputs (memory-efficient kernels)."""
    return F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous())  # [B, H, Nq, d]


def attention_sliced(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slices: int) -> torch.Tensor:
    """Basic attention over `slices` query slices; the score working set shrinks by that factor."""
    b, h, nq, _ = q.shape
    out = torch.empty(b, h, nq, v.shape[-1], dtype=v.dtype, device=v.device)  # [B, H, Nq, dv]
    step = math.ceil(nq / slices)
    for start in range(0, nq, step):
        out[:, :, start : start + step] = attention_basic(q[:, :, start : start + step], k, v)
    return out


def split_slices(q: torch.Tensor, k: torch.Tensor, free: int) -> int:
    """Fewest power-of-two query slices whose scores fit SPLIT_FRACTION of `free` bytes (at most Nq)."""
    b, h, nq, _ = q.shape
    need = b * h * nq * k.shape[-2] * score_bytes(q.dtype)
    slices = 1
    while slices < nq and need / slices > free * SPLIT_FRACTION:
        slices *= 2
    return min(slices, nq)


def attention_split(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Sliced attention; on out-of-memory, retry with twice the slices up to the limit, then re-raise."""
    slices = split_slices(q, k, available_memory(q.device))
    limit = min(q.shape[-2], SPLIT_MAX_SLICES)
    while True:
        try:
            return attention_sliced(q, k, v, slices)
        except RuntimeError as err:
            if not is_out_of_memory(err) or slices >= limit:
                raise
            if q.device.type == "cuda":
                torch.cuda.empty_cache()
            slices = min(slices * 2, limit)


def chunk_sizes(q: torch.Tensor, k: torch.Tensor) -> tuple[int, int]:
    """(query chunk, key chunk) of the sub-quadratic backend: one score chunk stays under CHUNK_BYTES."""
    b, h, nq, _ = q.shape
    row = b * h * score_bytes(q.dtype)  # bytes per score element across batch and heads
    q_chunk = min(nq, CHUNK_QUERY)
    k_chunk = max(1, min(k.shape[-2], CHUNK_BYTES // (row * q_chunk)))
    return max(1, min(q_chunk, CHUNK_BYTES // (row * k_chunk))), k_chunk


def attention_chunked_with(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_chunk: int, key_chunk: int
) -> torch.Tensor:
    """Sub-quadratic attention with explicit chunk sizes: a running max and sum over key chunks, in fp32."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    b, h, nq, _ = q.shape
    nk = k.shape[-2]
    out = torch.empty(b, h, nq, v.shape[-1], dtype=v.dtype, device=v.device)  # [B, H, Nq, dv]
    for qs in range(0, nq, query_chunk):
        q_c = q[:, :, qs : qs + query_chunk] * scale  # [B, H, qc, d]
        rows = q_c.shape[-2]
        run_max = torch.full((b, h, rows, 1), -math.inf, dtype=torch.float32, device=q.device)
        run_sum = torch.zeros(b, h, rows, 1, dtype=torch.float32, device=q.device)
        acc = torch.zeros(b, h, rows, v.shape[-1], dtype=torch.float32, device=q.device)  # [B, H, qc, dv]
        for ks in range(0, nk, key_chunk):
            s = torch.matmul(q_c, k[:, :, ks : ks + key_chunk].transpose(-1, -2)).float()  # [B, H, qc, kc]
            new_max = torch.maximum(run_max, s.amax(dim=-1, keepdim=True))  # [B, H, qc, 1]
            p = s.sub_(new_max).exp_()  # [B, H, qc, kc], in place
            correction = torch.exp(run_max - new_max)
            run_sum = run_sum * correction + p.sum(dim=-1, keepdim=True)
            acc = acc * correction + torch.matmul(p.to(v.dtype), v[:, :, ks : ks + key_chunk]).float()
            run_max = new_max
        out[:, :, qs : qs + rows] = (acc / run_sum).to(v.dtype)
    return out


def attention_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Sub-quadratic chunked attention with chunk sizes from `chunk_sizes`."""
    return attention_chunked_with(q, k, v, *chunk_sizes(q, k))


def attention_xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """xformers' memory_efficient_attention (its layout is [B, N, heads, d])."""
    if q.device.type not in XFORMERS_DEVICES:
        raise ValueError(f"the xformers attention backend needs CUDA tensors, got {q.device.type}; use 'sdpa' or 'auto'")
    import xformers.ops as xops

    out = xops.memory_efficient_attention(*(t.transpose(1, 2).contiguous() for t in (q, k, v)))  # [B, Nq, H, d]
    return out.transpose(1, 2)  # [B, H, Nq, d]


def choose_backend(q: torch.Tensor, k: torch.Tensor, free: int | None = None) -> str:
    """The backend `auto` uses for these shapes: sdpa while the scores fit, else AUTO_FALLBACK by device."""
    b, h, nq, _ = q.shape
    free = available_memory(q.device) if free is None else free
    if b * h * nq * k.shape[-2] * score_bytes(q.dtype) <= free * AUTO_FRACTION:
        return "sdpa"
    return AUTO_FALLBACK.get(q.device.type, "chunked")


def attention_auto(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Pick a backend per call by device and size (see `choose_backend`)."""
    return BACKENDS[choose_backend(q, k)](q, k, v)


BACKENDS: dict[str, AttentionFn] = {
    "basic": attention_basic,
    "split": attention_split,
    "chunked": attention_chunked,
    "sdpa": attention_sdpa,
    "auto": attention_auto,
}
if importlib.util.find_spec("xformers") is not None:
    BACKENDS["xformers"] = attention_xformers

_default: list[str] = ["sdpa"]
_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("vaetool_attention", default=None)
_limit: contextvars.ContextVar[int | None] = contextvars.ContextVar("vaetool_attention_limit", default=None)


def available_memory(device: torch.device) -> int:
    """Free bytes on `device`, capped by the active `limit_attention_memory` block."""
    free = free_memory(device)
    cap = _limit.get()
    return free if cap is None else min(free, cap)


@contextlib.contextmanager
def limit_attention_memory(max_bytes: int | None) -> Iterator[None]:
    """Within the block, split and auto treat at most `max_bytes` as free (None: no cap)."""
    token = _limit.set(max_bytes)
    try:
        yield
    finally:
        _limit.reset(token)


def register_backend(name: str, fn: AttentionFn) -> None:
    """Make an attention function selectable by name."""
    BACKENDS[name] = fn


def resolve_backend(name: str) -> AttentionFn:
    """Return the backend called `name`, or raise ValueError saying why it is not available."""
    try:
        return BACKENDS[name]
    except KeyError:
        if name in UNAVAILABLE:
            raise ValueError(f"attention backend {name!r} is not available: {UNAVAILABLE[name]}") from None
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(sorted(BACKENDS))}") from None


def set_default_attention(name: str) -> None:
    """Set the process-wide backend used when no `use_attention` block is active."""
    resolve_backend(name)
    _default[0] = name


def current_attention() -> str:
    """Name of the backend `attention` dispatches to right now."""
    return _current.get() or _default[0]


@contextlib.contextmanager
def use_attention(name: str) -> Iterator[None]:
    """Run the enclosed block with the attention backend `name`."""
    resolve_backend(name)
    token = _current.set(name)
    try:
        yield
    finally:
        _current.reset(token)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention with scale 1/sqrt(d) on [B, heads, N, d] tensors, by the current backend."""
    return BACKENDS[current_attention()](q, k, v)
