"""Transformer pieces: GEGLU, FeedForward, CrossAttention, BasicTransformerBlock, and the
diffusion-model style `timestep_embedding` (used by the temporal decoder and the spatial transformers).

State-dict names follow upstream (`ff.net.0.proj`, `ff.net.2`, `attn1.to_q`, `attn1.to_out.0`, ...).
All attention goes through `vaetool.nn.attention.attention`, so the backend is chosen at call time;
a mask (CrossAttention's `mask`, the block's `context_mask`) makes it a backend that takes masks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vaetool.nn.attention import attention
from vaetool.nn.checkpoint import checkpoint


def timestep_embedding(
    timesteps: torch.Tensor, dim: int, max_period: float = 10000, repeat_only: bool = False
) -> torch.Tensor:
    """Sinusoidal embeddings [N] -> [N, dim]: cos half then sin half, freqs exp(-ln(max_period) * i / half).

    Differs from the VAE's `get_timestep_embedding` (sin first, divisor half - 1). With `repeat_only`
    each timestep is simply repeated `dim` times. An odd `dim` gets a trailing zero column.
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be 1-D, got shape {tuple(timesteps.shape)}")
    if repeat_only:
        return timesteps[:, None].expand(-1, dim)  # [N, dim]
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )  # [half]
    args = timesteps[:, None].float() * freqs[None]  # [N, half]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [N, 2*half]
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)  # [N, dim]
    return emb


class GEGLU(nn.Module):
    """Gated GELU: project to 2*dim_out, split into (x, gate), return x * gelu(gate)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)  # [..., dim_out] each
        return x * F.gelu(gate)


class GELUProj(nn.Module):
    """Linear followed by GELU (the non-gated FeedForward input projection, kept under `.proj`)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))  # [..., dim_out]


class FeedForward(nn.Module):
    """net = (GEGLU | Linear+GELU) -> Dropout -> Linear; inner width dim * mult."""

    def __init__(
        self, dim: int, dim_out: int | None = None, mult: int = 4, glu: bool = False, dropout: float = 0.0
    ) -> None:
        super().__init__()
        inner_dim = int(dim * mult)
        dim_out = dim if dim_out is None else dim_out
        project_in: nn.Module = GEGLU(dim, inner_dim) if glu else GELUProj(dim, inner_dim)
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # [..., dim] -> [..., dim_out]


class CrossAttention(nn.Module):
    """Multi-head attention of x over `context` (x itself when None), projections without bias."""

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads, self.dim_head = heads, dim_head
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.reshape(b, n, self.heads, self.dim_head).transpose(1, 2)  # [B, heads, N, d]

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, N, query_dim], context [B, M, context_dim] (default x), value (default context) -> [B, N, query_dim].

        `mask` broadcasts to [B, heads, N, M] ([N, M], [B, N, M] gain the missing leading dims): bool
        True attends, a float mask is added to the scores (see vaetool.nn.attention).
        """
        context = x if context is None else context
        value = context if value is None else value
        q, k, v = self._split(self.to_q(x)), self._split(self.to_k(context)), self._split(self.to_v(value))
        if mask is not None and mask.ndim == 3:
            mask = mask[:, None]  # [B, N, M] -> [B, 1, N, M]: the same for every head
        out = attention(q, k, v, mask=mask)  # [B, heads, N, d]
        b, _, n, _ = out.shape
        out = out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head)  # [B, N, inner]
        return self.to_out(out)


class BasicTransformerBlock(nn.Module):
    """[norm_in -> ff_in] -> norm1 -> attn1 -> norm2 -> attn2 -> norm3 -> ff, each with a residual.

    `ff_in` (or an `inner_dim` != dim) adds an input feed-forward into the inner width; the input and
    output feed-forwards get residuals only when inner_dim == dim (`is_res`). attn1 is self-attention
    unless `disable_self_attn`; attn2 attends over `context`, or over its own input when
    `switch_temporal_ca_to_sa` or when no context is given; `disable_temporal_crossattention` drops it.
    `context_mask` [B, M] (bool True: attend; float: added) masks the context tokens for every
    attention whose keys are the context. `checkpoint` (default True, as upstream) recomputes the
    block's activations in backward instead of keeping them (vaetool.nn.checkpoint); it is also
    reachable as `gradient_checkpointing`.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        d_head: int,
        dropout: float = 0.0,
        context_dim: int | None = None,
        gated_ff: bool = True,
        checkpoint: bool = True,
        ff_in: bool = False,
        inner_dim: int | None = None,
        disable_self_attn: bool = False,
        disable_temporal_crossattention: bool = False,
        switch_temporal_ca_to_sa: bool = False,
    ) -> None:
        super().__init__()
        self.use_ff_in = ff_in or inner_dim is not None
        inner_dim = dim if inner_dim is None else inner_dim
        self.is_res = inner_dim == dim
        if self.use_ff_in:
            self.norm_in = nn.LayerNorm(dim)
            self.ff_in = FeedForward(dim, dim_out=inner_dim, dropout=dropout, glu=gated_ff)
        self.disable_self_attn = disable_self_attn
        self.switch_temporal_ca_to_sa = switch_temporal_ca_to_sa
        self.attn1 = CrossAttention(
            inner_dim, context_dim=context_dim if disable_self_attn else None,
            heads=n_heads, dim_head=d_head, dropout=dropout,
        )
        self.ff = FeedForward(inner_dim, dim_out=dim, dropout=dropout, glu=gated_ff)
        if disable_temporal_crossattention and switch_temporal_ca_to_sa:
            raise ValueError("switch_temporal_ca_to_sa needs attn2, but disable_temporal_crossattention removes it")
        self.attn2: CrossAttention | None = None
        if not disable_temporal_crossattention:
            self.norm2 = nn.LayerNorm(inner_dim)
            self.attn2 = CrossAttention(
                inner_dim, context_dim=None if switch_temporal_ca_to_sa else context_dim,
                heads=n_heads, dim_head=d_head, dropout=dropout,
            )
        self.norm1 = nn.LayerNorm(inner_dim)
        self.norm3 = nn.LayerNorm(inner_dim)
        self.checkpoint = checkpoint

    @property
    def gradient_checkpointing(self) -> bool:
        """The `checkpoint` flag under the name vaetool.nn.checkpoint.set_gradient_checkpointing sets."""
        return self.checkpoint

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool) -> None:
        self.checkpoint = enabled

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [B, N, dim], context [B, M, context_dim] or None, context_mask [B, M] or None -> [B, N, dim]."""
        return checkpoint(self._forward, (x, context, context_mask), self.parameters(), self.checkpoint)

    def _forward(
        self, x: torch.Tensor, context: torch.Tensor | None, context_mask: torch.Tensor | None
    ) -> torch.Tensor:
        if context is None:
            context_mask = None
        elif context_mask is not None and context_mask.ndim == 2:
            context_mask = context_mask[:, None, None, :]  # [B, M] -> [B, 1, 1, M]: every head and query
        if self.use_ff_in:
            h = self.ff_in(self.norm_in(x))  # [B, N, inner]
            x = x + h if self.is_res else h
        over_context = self.disable_self_attn and context is not None
        x = x + self.attn1(self.norm1(x), context=context if over_context else None,
                           mask=context_mask if over_context else None)
        if self.attn2 is not None:
            over_context = not self.switch_temporal_ca_to_sa and context is not None
            x = x + self.attn2(self.norm2(x), context=context if over_context else None,
                               mask=context_mask if over_context else None)
        h = self.ff(self.norm3(x))  # [B, N, dim]
        return x + h if self.is_res else h
