"""Transformers on feature maps: SpatialTransformer (image) and SpatialVideoTransformer (frames).

SpatialTransformer: GroupNorm, proj_in (1x1 conv, or Linear with `use_linear`), `depth`
BasicTransformerBlocks over the H*W tokens (cross-attending to `context` when given), proj_out,
plus the input. SpatialVideoTransformer adds, after each spatial block, a temporal block over the
T frames of every position (`time_stack`, fed a learned embedding of the frame index) and blends
the two with an AlphaBlender (`time_mixer`). State-dict names are the ldm/sgm ones; the same
blocks as diffusers' Transformer2DModel / TransformerSpatioTemporalModel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange, repeat
from torch import nn

from vaetool.nn.blending import AlphaBlender
from vaetool.nn.temporal import _frames
from vaetool.nn.transformer import BasicTransformerBlock, timestep_embedding

ContextDim = int | Sequence[int] | None
Context = torch.Tensor | Sequence[torch.Tensor | None] | None


def _per_block(value: ContextDim | Context, depth: int, what: str) -> list:
    """One entry per block: a list as given (its length checked), anything else repeated."""
    if isinstance(value, (list, tuple)):
        if len(value) != depth:
            raise ValueError(f"{what} has {len(value)} entries for {depth} transformer blocks")
        return list(value)
    return [value] * depth


class SpatialTransformer(nn.Module):
    """x + proj_out(blocks(proj_in(norm(x)))) over the H*W positions of x [B, C, H, W]."""

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim: ContextDim = None,
        disable_self_attn: bool = False,
        use_linear: bool = False,
        use_checkpoint: bool = True,
    ) -> None:
        super().__init__()
        context_dims = _per_block(context_dim, depth, "context_dim")
        self.in_channels, self.use_linear = in_channels, use_linear
        inner_dim = n_heads * d_head
        self.norm = nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)
        proj: type[nn.Module] = nn.Linear if use_linear else nn.Conv2d
        one = {} if use_linear else {"kernel_size": 1}
        self.proj_in = proj(in_channels, inner_dim, **one)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, n_heads, d_head, dropout=dropout, context_dim=context_dims[d],
                                  disable_self_attn=disable_self_attn, checkpoint=use_checkpoint)
            for d in range(depth)
        )
        self.proj_out = proj(inner_dim, in_channels, **one)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """norm and proj_in: [B, C, H, W] -> [B, H*W, inner]."""
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)  # [B, inner, H, W]
        h = rearrange(h, "b c h w -> b (h w) c")
        return self.proj_in(h) if self.use_linear else h

    def image(self, h: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """proj_out: [B, H*W, inner] -> [B, C, H, W]."""
        if self.use_linear:
            h = self.proj_out(h)
        h = rearrange(h, "b (h w) c -> b c h w", h=height, w=width)
        return h if self.use_linear else self.proj_out(h)

    def forward(
        self, x: torch.Tensor, context: Context = None, context_mask: torch.Tensor | None = None, **kwargs: object
    ) -> torch.Tensor:
        """x [B, C, H, W]; context [B, M, context_dim] (or one per block); context_mask [B, M]. Other keywords are ignored."""
        contexts = _per_block(context, len(self.transformer_blocks), "context")
        h = self.tokens(x)  # [B, HW, inner]
        for block, ctx in zip(self.transformer_blocks, contexts, strict=True):
            h = block(h, context=ctx, context_mask=context_mask)
        return self.image(h, *x.shape[2:]) + x


class SpatialVideoTransformer(SpatialTransformer):
    """SpatialTransformer whose every block is followed by attention across frames, blended by `time_mixer`.

    Frames travel flattened in the batch, x [B*T, C, H, W], T = `timesteps` (default: the whole
    batch is one clip). The temporal blocks attend over `time_context` (with `use_spatial_context`,
    each clip's first-frame `context`), one per clip, repeated for every position.
    """

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        use_linear: bool = False,
        context_dim: ContextDim = None,
        use_spatial_context: bool = False,
        timesteps: int | None = None,
        merge_strategy: str = "fixed",
        merge_factor: float = 0.5,
        time_context_dim: int | None = None,
        ff_in: bool = False,
        checkpoint: bool = False,
        time_depth: int = 1,
        disable_self_attn: bool = False,
        disable_temporal_crossattention: bool = False,
        max_time_embed_period: int = 10000,
    ) -> None:
        if n_heads * d_head != in_channels:
            raise ValueError(f"SpatialVideoTransformer needs n_heads * d_head == in_channels (the frame embedding is "
                             f"added to the tokens), got {n_heads} * {d_head} for {in_channels} channels")
        super().__init__(in_channels, n_heads, d_head, depth=depth, dropout=dropout, context_dim=context_dim,
                         disable_self_attn=disable_self_attn, use_linear=use_linear, use_checkpoint=checkpoint)
        self.time_depth, self.depth, self.timesteps = time_depth, depth, timesteps
        self.max_time_embed_period = max_time_embed_period
        self.use_spatial_context = use_spatial_context
        inner_dim = n_heads * d_head
        if use_spatial_context:
            time_context_dim = context_dim
        self.time_stack = nn.ModuleList(
            BasicTransformerBlock(inner_dim, n_heads, d_head, dropout=dropout, context_dim=time_context_dim,
                                  checkpoint=checkpoint, ff_in=ff_in, inner_dim=inner_dim, disable_self_attn=disable_self_attn,
                                  disable_temporal_crossattention=disable_temporal_crossattention)
            for _ in range(depth)
        )
        self.time_pos_embed = nn.Sequential(
            nn.Linear(in_channels, 4 * in_channels), nn.SiLU(), nn.Linear(4 * in_channels, in_channels)
        )
        self.time_mixer = AlphaBlender(alpha=merge_factor, merge_strategy=merge_strategy)

    def _time_context(self, context: torch.Tensor | None, time_context: torch.Tensor | None, t: int, positions: int) -> torch.Tensor | None:
        """The temporal blocks' context, one row per (clip, position): [B*H*W, M, C]."""
        if self.use_spatial_context:
            if context is None or context.ndim != 3:
                raise ValueError("use_spatial_context needs a context [B*T, M, C]")
            time_context = (context if time_context is None else time_context)[::t]  # each clip's first frame
        elif time_context is None:
            return None
        if time_context.ndim == 2:
            time_context = time_context[:, None]  # [B, C] -> [B, 1, C]
        return repeat(time_context, "b ... -> (b n) ...", n=positions)

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        time_context: torch.Tensor | None = None,
        timesteps: int | None = None,
        image_only_indicator: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        """x [B*T, C, H, W], context [B*T, M, context_dim], image_only_indicator [B, T] -> [B*T, C, H, W]."""
        height, width = x.shape[2:]
        t = _frames(x.shape[0], timesteps if timesteps is not None else self.timesteps)
        time_context = self._time_context(context, time_context, t, height * width)
        h = self.tokens(x)  # [B*T, HW, inner]
        frame = torch.arange(t, device=x.device).repeat(x.shape[0] // t)  # [B*T]: 0..T-1 per clip
        emb = timestep_embedding(frame, self.in_channels, max_period=self.max_time_embed_period).to(h.dtype)
        emb = self.time_pos_embed(emb)[:, None, :]  # [B*T, 1, C]
        for block, mix_block in zip(self.transformer_blocks, self.time_stack, strict=True):
            h = block(h, context=context, context_mask=context_mask)  # [B*T, HW, inner]
            mix = rearrange(h + emb, "(b t) s c -> (b s) t c", t=t)
            mix = mix_block(mix, context=time_context)  # [B*HW, T, inner]
            mix = rearrange(mix, "(b s) t c -> (b t) s c", s=height * width)
            h = self.time_mixer(x_spatial=h, x_temporal=mix, image_only_indicator=image_only_indicator)
        return self.image(h, height, width) + x
