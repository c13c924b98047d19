"""HybridConditioner: two conditioning models from config, one for concatenation, one for cross-attention."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vaetool.config import instantiate_from_config


class HybridConditioner(nn.Module):
    """Runs `concat_conditioner` on c_concat and `crossattn_conditioner` on c_crossattn (ldm's util.HybridConditioner)."""

    def __init__(self, c_concat_config: dict[str, Any], c_crossattn_config: dict[str, Any]) -> None:
        super().__init__()
        self.concat_conditioner = instantiate_from_config(c_concat_config)
        self.crossattn_conditioner = instantiate_from_config(c_crossattn_config)

    def forward(self, c_concat: torch.Tensor, c_crossattn: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """{'c_concat': [concat_conditioner(c_concat)], 'c_crossattn': [crossattn_conditioner(c_crossattn)]}."""
        return {"c_concat": [self.concat_conditioner(c_concat)], "c_crossattn": [self.crossattn_conditioner(c_crossattn)]}
