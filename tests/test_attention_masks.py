"""Masked attention: every backend against a hand computation, bool and additive masks, broadcast over heads and batch."""

from __future__ import annotations

import math

import pytest
import torch
from test_attention import _fake_xformers, max_diff, qkv

from vaetool.nn import attention as A

B, H, NQ, NK, D = 2, 3, 9, 11, 8
# mask shapes broadcast to [B, H, Nq, Nk]: over batch and heads, over heads, over batch, key padding, none
MASK_SHAPES = [(NQ, NK), (B, 1, NQ, NK), (1, H, NQ, NK), (B, 1, 1, NK), (B, H, NQ, NK)]


def hand(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row by row in float64: softmax over the kept keys (bool) or of the scores plus the mask (float)."""
    b, h, nq, d = q.shape
    m = mask.expand(b, h, nq, k.shape[2])
    out = torch.zeros(b, h, nq, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for i in range(nq):
                s = [float(q[bi, hi, i].double() @ k[bi, hi, j].double()) / math.sqrt(d) for j in range(k.shape[2])]
                if m.dtype == torch.bool:
                    keep = [j for j in range(len(s)) if m[bi, hi, i, j]]
                else:
                    s = [sj + float(m[bi, hi, i, j]) for j, sj in enumerate(s)]
                    keep = [j for j in range(len(s)) if s[j] != -math.inf]
                if not keep:
                    continue  # every key masked out: zeros
                top = max(s[j] for j in keep)
                w = {j: math.exp(s[j] - top) for j in keep}
                total = sum(w.values())
                for j, wj in w.items():
                    out[bi, hi, i] += wj / total * v[bi, hi, j].double()
    return out


def make_mask(shape: tuple[int, ...], kind: str) -> torch.Tensor:
    keep = torch.rand(shape) > 0.4
    keep[..., 0] = True  # at least one key per row
    if kind == "bool":
        return keep
    return torch.where(keep, torch.randn(shape), torch.full(shape, -math.inf))  # additive: a bias, -inf drops a key


@pytest.mark.parametrize("kind", ["bool", "additive"])
@pytest.mark.parametrize("shape", MASK_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", ["basic", "split", "chunked", "sdpa", "auto"])
def test_backend_with_mask_matches_hand(name: str, shape: tuple[int, ...], kind: str) -> None:
    q, k, v = qkv(B, H, NQ, NK, D)
    mask = make_mask(shape, kind)
    with A.use_attention(name):
        out = A.attention(q, k, v, mask=mask)
    assert out.shape == (B, H, NQ, D)
    assert max_diff(out, hand(q, k, v, mask)) <= 1e-5


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_xformers_with_mask_matches_hand(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    _fake_xformers(monkeypatch)
    monkeypatch.setattr(A, "XFORMERS_DEVICES", frozenset({"cuda", "cpu"}))
    q, k, v = qkv(B, H, NQ, NK, D)
    mask = make_mask((B, 1, 1, NK), kind)
    with A.use_attention("xformers"):
        out = A.attention(q, k, v, mask=mask)
    assert max_diff(out, hand(q, k, v, mask)) <= 1e-5


@pytest.mark.parametrize("chunks", [(2, 3), (4, 1), (100, 100)])
@pytest.mark.parametrize("shape", [(NQ, NK), (B, 1, 1, NK), (1, H, NQ, 1)])
def test_chunked_and_sliced_masks_follow_the_chunks(chunks: tuple[int, int], shape: tuple[int, ...]) -> None:
    q, k, v = qkv(B, H, NQ, NK, D)
    mask = torch.randn(shape)
    expected = hand(q, k, v, mask)
    assert max_diff(A.attention_chunked_with(q, k, v, *chunks, mask=mask), expected) <= 1e-5
    assert max_diff(A.attention_sliced(q, k, v, chunks[0], mask=mask), expected) <= 1e-5


@pytest.mark.parametrize("name", ["basic", "split", "chunked", "sdpa"])
def test_a_row_with_every_key_masked_is_zero(name: str) -> None:
    q, k, v = qkv(1, 2, 4, 6, 4)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[2] = False
    with A.use_attention(name):
        out = A.attention(q, k, v, mask=mask)
        additive = A.attention(q, k, v, mask=torch.zeros(4, 6).masked_fill(~mask, -math.inf))
    assert torch.equal(out[:, :, 2], torch.zeros(1, 2, 4)) and torch.isfinite(out).all()
    assert max_diff(out, additive) <= 1e-6 and max_diff(out, hand(q, k, v, mask)) <= 1e-5


def test_chunked_mask_with_a_chunk_masked_out_entirely() -> None:
    q, k, v = qkv(1, 1, 5, 8, 4)
    mask = torch.ones(5, 8, dtype=torch.bool)
    mask[:, :4] = False  # the first key chunk is all masked: the running max starts at -inf
    out = A.attention_chunked_with(q, k, v, 5, 4, mask=mask)
    assert max_diff(out, hand(q, k, v, mask)) <= 1e-5


def test_bad_masks_are_value_errors() -> None:
    q, k, v = qkv(2, 1, 3, 4, 4)
    with pytest.raises(ValueError, match=r"does not broadcast to \[B, heads, Nq, Nk\] = \[2, 1, 3, 4\]"):
        A.attention(q, k, v, mask=torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="must be bool"):
        A.attention(q, k, v, mask=torch.ones(3, 4, dtype=torch.int64))


def test_a_backend_without_masks_hands_masked_calls_to_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def plain(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return A.attention_basic(q, k, v)

    monkeypatch.setitem(A.BACKENDS, "plain", plain)
    monkeypatch.setattr(A, "MASK_BACKENDS", set(A.MASK_BACKENDS))
    A.register_backend("plain", plain)
    assert "plain" not in A.MASK_BACKENDS
    q, k, v = qkv(1, 2, 5, 5, 4)
    mask = make_mask((5, 5), "bool")
    with A.use_attention("plain"):
        assert A.backend_for(mask=True) == "auto" and A.backend_for(mask=False) == "plain"
        A.attention(q, k, v)
        out = A.attention(q, k, v, mask=mask)
    assert calls == [1]
    assert max_diff(out, hand(q, k, v, mask)) <= 1e-5


def test_auto_picks_a_mask_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, _ = qkv(1, 1, 100, 100, 8)
    monkeypatch.setitem(A.AUTO_FALLBACK, "cpu", "plain")  # a fallback that cannot take masks
    assert A.choose_backend(q, k, free=100, masked=False) == "plain"
    assert A.choose_backend(q, k, free=100, masked=True) == "chunked"
    assert A.choose_backend(q, k, free=10**9, masked=True) == "sdpa"


def test_optimized_attention_for_device() -> None:
    assert A.optimized_attention_for_device("cpu", small_input=True) is A.attention_sdpa
    assert A.optimized_attention_for_device("cpu") is A.attention_chunked
    assert A.optimized_attention_for_device("cpu", mask=True) is A.attention_chunked
    with A.use_attention("split"):
        assert A.optimized_attention_for_device("cuda", mask=True) is A.attention_split
