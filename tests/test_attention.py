"""Every attention backend agrees with basic attention; split retries on out-of-memory; auto and xformers selection."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from vaetool.nn import attention as A
from vaetool.nn.blocks import AttnBlock

# (B, heads, Nq, Nk, d): self-attention, batch and heads > 1, cross attention (Nq != Nk), odd sizes
SHAPES = [(1, 1, 37, 37, 8), (2, 3, 50, 50, 16), (2, 2, 33, 70, 8), (3, 1, 129, 17, 32)]
BACKENDS = ["split", "chunked", "sdpa", "auto"]


def qkv(b: int, h: int, nq: int, nk: int, d: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    return (
        torch.randn(b, h, nq, d, dtype=dtype),
        torch.randn(b, h, nk, d, dtype=dtype),
        torch.randn(b, h, nk, d, dtype=dtype),
    )


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", BACKENDS)
def test_backend_matches_basic(name: str, shape: tuple[int, ...]) -> None:
    q, k, v = qkv(*shape)
    expected = A.attention_basic(q, k, v)
    with A.use_attention(name):
        out = A.attention(q, k, v)
    assert out.shape == expected.shape
    assert max_diff(out, expected) <= 1e-5


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("chunks", [(7, 11), (16, 5), (1000, 1000), (1, 1)])
def test_chunked_with_uneven_chunks_matches_basic(shape: tuple[int, ...], chunks: tuple[int, int]) -> None:
    q, k, v = qkv(*shape)
    out = A.attention_chunked_with(q, k, v, *chunks)
    assert max_diff(out, A.attention_basic(q, k, v)) <= 1e-5


def test_chunked_is_stable_for_large_scores() -> None:
    q, k, v = qkv(1, 1, 20, 30, 4)
    q, k = q * 30, k * 30  # scores in the thousands: a naive exp would overflow
    expected = A.attention_basic(q, k, v)
    out = A.attention_chunked_with(q, k, v, 6, 7)
    assert torch.isfinite(out).all()
    assert max_diff(out, expected) <= 1e-5


def test_chunked_bf16_close_to_basic() -> None:
    q, k, v = qkv(2, 2, 40, 40, 16, torch.bfloat16)
    out = A.attention_chunked_with(q, k, v, 9, 13)
    assert out.dtype == torch.bfloat16
    assert max_diff(out, A.attention_basic(q.float(), k.float(), v.float())) <= 3e-2


def test_chunk_sizes_bound_the_score_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(A, "CHUNK_BYTES", 4096)
    q, k, _ = qkv(1, 2, 300, 500, 8)
    qc, kc = A.chunk_sizes(q, k)
    assert 1 <= qc <= 300 and 1 <= kc < 500
    assert 2 * qc * kc * A.score_bytes(torch.float32) <= 4096
    assert A.chunk_sizes(q[:, :, :10], k[:, :, :10]) == (10, 10)  # small inputs: one chunk


@pytest.mark.parametrize("free, slices", [(10**12, 1), (64 * 64 * 8 // 4, 8), (1, 64)])
def test_split_slices_from_free_memory(free: int, slices: int) -> None:
    q, k, _ = qkv(1, 1, 64, 64, 8)
    assert A.split_slices(q, k, free) == slices


def test_split_with_little_free_memory_matches_basic(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v = qkv(2, 2, 45, 30, 8)
    calls: list[int] = []
    real = A.attention_sliced

    def spy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slices: int, mask: torch.Tensor | None = None) -> torch.Tensor:
        calls.append(slices)
        return real(q, k, v, slices, mask=mask)

    monkeypatch.setattr(A, "attention_sliced", spy)
    with A.limit_attention_memory(2 * 2 * 45 * 30):
        out = A.attention_split(q, k, v)
    assert calls[0] > 1
    assert max_diff(out, A.attention_basic(q, k, v)) <= 1e-5


def test_split_retries_with_twice_the_slices_after_oom(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v = qkv(1, 2, 40, 40, 8)
    calls: list[int] = []
    real = A.attention_sliced

    def first_fails(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slices: int, mask: torch.Tensor | None = None) -> torch.Tensor:
        calls.append(slices)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("simulated out of memory")
        return real(q, k, v, slices, mask=mask)

    monkeypatch.setattr(A, "attention_sliced", first_fails)
    with A.use_attention("split"):
        out = A.attention(q, k, v)
    assert calls == [calls[0], 2 * calls[0]]
    assert max_diff(out, A.attention_basic(q, k, v)) <= 1e-5


def test_split_reraises_when_slices_run_out(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v = qkv(1, 1, 10, 10, 4)
    calls: list[int] = []

    def always_fails(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slices: int, mask: torch.Tensor | None = None) -> torch.Tensor:
        calls.append(slices)
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")

    monkeypatch.setattr(A, "attention_sliced", always_fails)
    with pytest.raises(RuntimeError, match="can't allocate memory"):
        A.attention_split(q, k, v)
    assert calls == [1, 2, 4, 8, 10]


def test_split_does_not_retry_other_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v = qkv(1, 1, 10, 10, 4)
    calls: list[int] = []

    def broken(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slices: int, mask: torch.Tensor | None = None) -> torch.Tensor:
        calls.append(slices)
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(A, "attention_sliced", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        A.attention_split(q, k, v)
    assert calls == [1]


def test_auto_chooses_sdpa_when_scores_fit_and_chunked_on_cpu_otherwise() -> None:
    q, k, _ = qkv(1, 1, 100, 100, 8)
    assert A.choose_backend(q, k, free=10**9) == "sdpa"
    assert A.choose_backend(q, k, free=100 * 100) == A.AUTO_FALLBACK["cpu"] == "chunked"
    with A.limit_attention_memory(1000):
        assert A.choose_backend(q, k) == "chunked"


def test_limit_attention_memory_caps_and_restores() -> None:
    dev = torch.device("cpu")
    unlimited = A.available_memory(dev)
    with A.limit_attention_memory(12345):
        assert A.available_memory(dev) == 12345
    assert A.available_memory(dev) >= unlimited // 2  # restored (free memory moves a little)


def test_xformers_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(A.BACKENDS, "xformers", raising=False)
    with pytest.raises(ValueError, match=r"pip install 'vaetool\[xformers\]'"):
        A.resolve_backend("xformers")
    with pytest.raises(ValueError, match="xformers"), A.use_attention("xformers"):
        pass


def test_unknown_backend_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="basic, chunked, sdpa, split"):
        A.set_default_attention("nope")


def _fake_xformers(monkeypatch: pytest.MonkeyPatch) -> None:
    def memory_efficient_attention(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        # xformers' layout is [B, N, heads, d]; attn_bias is a dense [B, heads, Nq, Nk] tensor added to the scores
        if attn_bias is not None:
            assert attn_bias.shape == (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
            assert attn_bias.stride(-2) % 8 == 0  # rows 8-aligned, as xformers requires
        out = A.attention_basic(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask=attn_bias)
        return out.transpose(1, 2)

    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = memory_efficient_attention  # type: ignore[attr-defined]
    pkg = types.ModuleType("xformers")
    pkg.ops = ops  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "xformers", pkg)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    monkeypatch.setitem(A.BACKENDS, "xformers", A.attention_xformers)


def test_xformers_layout_matches_basic(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_xformers(monkeypatch)
    monkeypatch.setattr(A, "XFORMERS_DEVICES", frozenset({"cuda", "cpu"}))
    q, k, v = qkv(2, 3, 21, 13, 8)
    with A.use_attention("xformers"):
        out = A.attention(q, k, v)
    assert max_diff(out, A.attention_basic(q, k, v)) <= 1e-5


def test_xformers_refuses_cpu_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_xformers(monkeypatch)
    q, k, v = qkv(1, 1, 4, 4, 4)
    with pytest.raises(ValueError, match="needs CUDA tensors, got cpu"):
        A.attention_xformers(q, k, v)


@pytest.mark.parametrize("name", BACKENDS)
def test_attn_block_call_site_matches_basic(name: str) -> None:
    block = AttnBlock(32).eval()
    x = torch.randn(2, 32, 7, 9)  # 63 positions: odd, non-contiguous q/k/v views at the call site
    with torch.inference_mode():
        with A.use_attention("basic"):
            expected = block(x)
        with A.use_attention(name):
            out = block(x)
    assert max_diff(out, expected) <= 1e-5
