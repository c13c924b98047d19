"""Attention backends behind one call: `attention(q, k, v)` on [B, heads, N, d] tensors.

Every call site (the VAE's AttnBlock, the transformer blocks) goes through `attention`, which
dispatches to the backend chosen with `use_attention(name)` (a context manager; thread- and
task-safe through a ContextVar) or the process default set by `set_default_attention(name)`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def attention_basic(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Materialise the whole score matrix (the reference every backend is tested against)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, H, Nq, Nk]
    probs = scores.float().softmax(dim=-1).to(v.dtype)
    return torch.matmul(probs, v)  # [B, H, Nq, d]


def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PyTorch's fused scaled_dot_product_attention."""
    return F.scaled_dot_product_attention(q, k, v)


BACKENDS: dict[str, AttentionFn] = {
    "basic": attention_basic,
    "sdpa": attention_sdpa,
}

_default: list[str] = ["sdpa"]
_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("vaetool_attention", default=None)


def register_backend(name: str, fn: AttentionFn) -> None:
    """Make an attention function selectable by name."""
    BACKENDS[name] = fn


def resolve_backend(name: str) -> AttentionFn:
    """Return the backend called `name`, or raise ValueError listing the known ones."""
    try:
        return BACKENDS[name]
    except KeyError:
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
