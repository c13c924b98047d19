"""Attention backends behind one call: `attention(q, k, v, mask=None)` on [B, heads, N, d] tensors.

Every call site (the VAE's AttnBlock, the transformer blocks) goes through `attention`, which
dispatches to the backend chosen with `use_attention(name)` (a context manager; thread- and
task-safe through a ContextVar) or the process default set by `set_default_attention(name)`.

Masks (PyTorch SDPA's convention): `mask` broadcasts to [B, heads, Nq, Nk] by torch's rules (so
[Nq, Nk], [B, 1, Nq, Nk], [B, 1, 1, Nk] for key padding, ...); a bool mask marks with True the
keys that take part, a float mask is added to the scores. A query row whose keys are all masked
out gives zeros on every backend (as SDPA does on CPU). Every built-in backend takes masks; a
backend registered without mask support is replaced by `auto` for masked calls.

Backends (all softmax(q k^T / sqrt(d) [+ mask]) v; q and k/v lengths may differ):
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

AttentionFn = Callable[..., torch.Tensor]  # fn(q, k, v, mask=None) -> [B, heads, Nq, dv]

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


def as_mask(mask: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """`mask` as a 4-D view broadcastable to [B, heads, Nq, Nk]; ValueError when it cannot be."""
    if mask is None:
        return None
    target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    m = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape)) if mask.ndim <= 4 else mask
    if m.ndim != 4 or any(got not in (1, want) for got, want in zip(m.shape, target, strict=False)):
        raise ValueError(f"attention mask of shape {tuple(mask.shape)} does not broadcast to [B, heads, Nq, Nk] = {list(target)}")
    if m.dtype != torch.bool and not m.is_floating_point():
        raise ValueError(f"attention mask must be bool (True: attend) or float (added to the scores), got {m.dtype}")
    return m


def mask_rows(m: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    """Query rows start:stop of a 4-D mask (a mask broadcast over queries is returned whole)."""
    return m if m is None or m.shape[2] == 1 else m[:, :, start:stop]


def mask_cols(m: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    """Key columns start:stop of a 4-D mask (a mask broadcast over keys is returned whole)."""
    return m if m is None or m.shape[3] == 1 else m[..., start:stop]


def masked_scores(scores: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """fp32 scores with a 4-D mask applied: -inf where a bool mask is False, the float mask added otherwise."""
    if m.dtype == torch.bool:
        return scores.masked_fill(~m, -math.inf)
    return scores + m.float()


def attention_basic(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Materialise the whole score matrix (the reference every backend is tested against)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, H, Nq, Nk]
    m = as_mask(mask, q, k)
    if m is None:
        probs = scores.float().softmax(dim=-1).to(v.dtype)
    else:
        scores = masked_scores(scores.float(), m)
        empty = scores.amax(dim=-1, keepdim=True) == -math.inf  # [B, H, Nq, 1]: every key masked out
        probs = scores.softmax(dim=-1).masked_fill_(empty, 0.0).to(v.dtype)
    return torch.matmul(probs, v)  # [B, H, Nq, d]


def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch's fused scaled_dot_product_attention on contiguous inputs (memory-efficient kernels)."""
    m = as_mask(mask, q, k)
    if m is not None and m.dtype != torch.bool:
        m = m.to(q.dtype)  # SDPA wants a float mask in the query's dtype
    return F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous(), attn_mask=m)  # [B, H, Nq, d]


def attention_sliced(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slices: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Basic attention over `slices` query slices; the score working set shrinks by that factor."""
    b, h, nq, _ = q.shape
    m = as_mask(mask, q, k)
    out = torch.empty(b, h, nq, v.shape[-1], dtype=v.dtype, device=v.device)  # [B, H, Nq, dv]
    step = math.ceil(nq / slices)
    for start in range(0, nq, step):
        out[:, :, start : start + step] = attention_basic(q[:, :, start : start + step], k, v, mask_rows(m, start, start + step))
    return out


def split_slices(q: torch.Tensor, k: torch.Tensor, free: int) -> int:
    """Fewest power-of-two query slices whose scores fit SPLIT_FRACTION of `free` bytes (at most Nq)."""
    b, h, nq, _ = q.shape
    need = b * h * nq * k.shape[-2] * score_bytes(q.dtype)
    slices = 1
    while slices < nq and need / slices > free * SPLIT_FRACTION:
        slices *= 2
    return min(slices, nq)


def attention_split(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sliced attention; on out-of-memory, retry with twice the slices up to the limit, then re-raise."""
    slices = split_slices(q, k, available_memory(q.device))
    limit = min(q.shape[-2], SPLIT_MAX_SLICES)
    while True:
        try:
            return attention_sliced(q, k, v, slices, mask=mask)
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
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_chunk: int, key_chunk: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Sub-quadratic attention with explicit chunk sizes: a running max and sum over key chunks, in fp32."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    b, h, nq, _ = q.shape
    nk = k.shape[-2]
    m = as_mask(mask, q, k)
    out = torch.empty(b, h, nq, v.shape[-1], dtype=v.dtype, device=v.device)  # [B, H, Nq, dv]
    for qs in range(0, nq, query_chunk):
        q_c = q[:, :, qs : qs + query_chunk] * scale  # [B, H, qc, d]
        rows = q_c.shape[-2]
        m_rows = mask_rows(m, qs, qs + rows)
        run_max = torch.full((b, h, rows, 1), -math.inf, dtype=torch.float32, device=q.device)
        run_sum = torch.zeros(b, h, rows, 1, dtype=torch.float32, device=q.device)
        acc = torch.zeros(b, h, rows, v.shape[-1], dtype=torch.float32, device=q.device)  # [B, H, qc, dv]
        for ks in range(0, nk, key_chunk):
            s = torch.matmul(q_c, k[:, :, ks : ks + key_chunk].transpose(-1, -2)).float()  # [B, H, qc, kc]
            if m_rows is not None:
                s = masked_scores(s, mask_cols(m_rows, ks, ks + key_chunk))
            new_max = torch.maximum(run_max, s.amax(dim=-1, keepdim=True))  # [B, H, qc, 1]
            safe_max = new_max.masked_fill(new_max == -math.inf, 0.0)  # rows masked out so far: no -inf - -inf
            p = s.sub_(safe_max).exp_()  # [B, H, qc, kc], in place
            correction = torch.exp(run_max - safe_max)
            run_sum = run_sum * correction + p.sum(dim=-1, keepdim=True)
            acc = acc * correction + torch.matmul(p.to(v.dtype), v[:, :, ks : ks + key_chunk]).float()
            run_max = new_max
        res = acc / run_sum
        if m is not None:
            res = res.masked_fill_(run_sum == 0, 0.0)  # every key masked out
        out[:, :, qs : qs + rows] = res.to(v.dtype)
    return out


def attention_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sub-quadratic chunked attention with chunk sizes from `chunk_sizes`."""
    return attention_chunked_with(q, k, v, *chunk_sizes(q, k), mask=mask)


def attention_xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """xformers' memory_efficient_attention (its layout is [B, N, heads, d]; a mask becomes its attn_bias)."""
    if q.device.type not in XFORMERS_DEVICES:
        raise ValueError(f"the xformers attention backend needs CUDA tensors, got {q.device.type}; use 'sdpa' or 'auto'")
    import xformers.ops as xops

    bias = None
    m = as_mask(mask, q, k)
    if m is not None:  # a dense additive bias [B, H, Nq, Nk] whose rows start 8-aligned, as xformers requires
        b, h, nq, nk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        full = torch.zeros(b, h, nq, nk + (-nk % 8), dtype=q.dtype, device=q.device)
        bias = full[..., :nk]
        bias.copy_(torch.where(m, 0.0, -math.inf) if m.dtype == torch.bool else m)
    qkv = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    out = xops.memory_efficient_attention(*qkv, attn_bias=bias)  # [B, Nq, H, d]
    return out.transpose(1, 2)  # [B, H, Nq, d]


def choose_backend(q: torch.Tensor, k: torch.Tensor, free: int | None = None, masked: bool = False) -> str:
    """The backend `auto` uses for these shapes: sdpa while the scores fit, else AUTO_FALLBACK by device.

    For a masked call the choice is always one in MASK_BACKENDS (chunked when the fallback is not).
    """
    b, h, nq, _ = q.shape
    free = available_memory(q.device) if free is None else free
    if b * h * nq * k.shape[-2] * score_bytes(q.dtype) <= free * AUTO_FRACTION:
        return "sdpa"
    name = AUTO_FALLBACK.get(q.device.type, "chunked")
    return "chunked" if masked and name not in MASK_BACKENDS else name


def attention_auto(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Pick a backend per call by device and size (see `choose_backend`)."""
    return BACKENDS[choose_backend(q, k, masked=mask is not None)](q, k, v, mask=mask)


BACKENDS: dict[str, AttentionFn] = {
    "basic": attention_basic,
    "split": attention_split,
    "chunked": attention_chunked,
    "sdpa": attention_sdpa,
    "auto": attention_auto,
}
MASK_BACKENDS: set[str] = {"basic", "split", "chunked", "sdpa", "auto", "xformers"}  # backends that take `mask`
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


def register_backend(name: str, fn: AttentionFn, masks: bool = False) -> None:
    """Make an attention function selectable by name; `masks`: it takes a `mask` keyword (see the module doc)."""
    BACKENDS[name] = fn
    if masks:
        MASK_BACKENDS.add(name)
    else:
        MASK_BACKENDS.discard(name)


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


def backend_for(mask: bool) -> str:
    """The backend a call uses now: the current one, or `auto` for a masked call it cannot take."""
    name = current_attention()
    return "auto" if mask and name not in MASK_BACKENDS else name


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention with scale 1/sqrt(d) on [B, heads, N, d] tensors, by the current backend."""
    if mask is None:
        return BACKENDS[current_attention()](q, k, v)
    return BACKENDS[backend_for(True)](q, k, v, mask=mask)


def optimized_attention_for_device(device: str | torch.device, mask: bool = False, small_input: bool = False) -> AttentionFn:
    """The seed's fixed per-device choice: sdpa for small inputs, chunked on CPU, else the current backend.

    With `mask` the function returned always takes masks (MASK_BACKENDS). Blocks call `attention`,
    which honours `use_attention`; this is for callers that want the seed's choice instead.
    """
    if small_input:
        return BACKENDS["sdpa"]
    if torch.device(device).type == "cpu":
        return BACKENDS["chunked"]
    return BACKENDS[backend_for(mask)]
