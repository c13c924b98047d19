"""Blending spatial and temporal features with a fixed or learned mix factor.

`register_mix_factor` / `mix_alpha` are shared by AlphaBlender and the temporal decoder blocks,
which keep their `mix_factor` at their own level of the state dict (`...block_1.mix_factor`).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

MERGE_STRATEGIES: tuple[str, ...] = ("fixed", "learned", "learned_with_images")


def register_mix_factor(
    module: nn.Module, alpha: float, merge_strategy: str, allowed: tuple[str, ...] = MERGE_STRATEGIES
) -> None:
    """Add `mix_factor` [1] to `module`: a buffer for "fixed", a Parameter for the learned strategies."""
    if merge_strategy not in allowed:
        raise ValueError(f"merge_strategy {merge_strategy!r} is not supported; choose one of {', '.join(allowed)}")
    value = torch.tensor([float(alpha)])
    if merge_strategy == "fixed":
        module.register_buffer("mix_factor", value)
    else:
        module.register_parameter("mix_factor", nn.Parameter(value))


def mix_alpha(mix_factor: torch.Tensor, merge_strategy: str) -> torch.Tensor:
    """The weight [1] for "fixed" (mix_factor as is) or "learned" (sigmoid(mix_factor))."""
    return mix_factor if merge_strategy == "fixed" else torch.sigmoid(mix_factor)


class AlphaBlender(nn.Module):
    """alpha * x_spatial + (1 - alpha) * x_temporal, alpha fixed, learned, or 1 on image-only frames.

    With "learned_with_images", `image_only_indicator` [b, t] marks frames that are single images
    (alpha 1: spatial only); `rearrange_pattern` shapes the per-frame alpha to broadcast over the
    features (the default "b t -> (b t) 1 1" suits [(b t), tokens, channels]).
    """

    strategies = MERGE_STRATEGIES

    def __init__(
        self,
        alpha: float,
        merge_strategy: str = "learned_with_images",
        rearrange_pattern: str = "b t -> (b t) 1 1",
    ) -> None:
        super().__init__()
        self.merge_strategy = merge_strategy
        self.rearrange_pattern = rearrange_pattern
        register_mix_factor(self, alpha, merge_strategy)

    def get_alpha(self, image_only_indicator: torch.Tensor | None = None) -> torch.Tensor:
        """The blending weight: [1], or shaped by `rearrange_pattern` for "learned_with_images"."""
        if self.merge_strategy != "learned_with_images":
            return mix_alpha(self.mix_factor, self.merge_strategy)
        if image_only_indicator is None:
            raise ValueError("merge_strategy 'learned_with_images' needs image_only_indicator [b, t]")
        learned = torch.sigmoid(self.mix_factor).to(image_only_indicator.device)  # [1]
        alpha = torch.where(image_only_indicator.bool(), torch.ones_like(learned), learned)  # [b, t]
        return rearrange(alpha, self.rearrange_pattern)

    def forward(
        self,
        x_spatial: torch.Tensor,
        x_temporal: torch.Tensor,
        image_only_indicator: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Blend two same-shaped tensors."""
        alpha = self.get_alpha(image_only_indicator).to(x_spatial.dtype)
        return alpha * x_spatial + (1.0 - alpha) * x_temporal
