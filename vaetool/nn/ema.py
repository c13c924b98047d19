"""An exponential moving average of a module's parameters (the LitEma convention of LDM/sgm)."""

from __future__ import annotations

import torch
from torch import nn


class LitEma(nn.Module):
    """Shadow copies of every trainable parameter, stored as buffers named without dots."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, use_num_updates: bool = True) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be between 0 and 1, got {decay}")
        self.m_name2s_name: dict[str, str] = {}
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0 if use_num_updates else -1, dtype=torch.int))
        for name, p in model.named_parameters():
            if p.requires_grad:
                s_name = name.replace(".", "")
                self.m_name2s_name[name] = s_name
                self.register_buffer(s_name, p.detach().clone().float())
        self.collected_params: list[torch.Tensor] = []

    def reset_num_updates(self) -> None:
        """Restart the warm-up of the decay."""
        self.num_updates.zero_()

    @torch.no_grad()
    def forward(self, model: nn.Module) -> None:
        """Move every shadow towards the model's current parameters."""
        decay = float(self.decay)
        if self.num_updates >= 0:
            self.num_updates += 1
            decay = min(decay, (1 + int(self.num_updates)) / (10 + int(self.num_updates)))
        shadows = dict(self.named_buffers())
        for name, p in model.named_parameters():
            if name in self.m_name2s_name:
                shadow = shadows[self.m_name2s_name[name]]
                shadow.sub_((1.0 - decay) * (shadow - p.detach().float()))

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the shadow weights into `model`."""
        shadows = dict(self.named_buffers())
        for name, p in model.named_parameters():
            if name in self.m_name2s_name:
                p.copy_(shadows[self.m_name2s_name[name]].to(p.dtype))

    def store(self, parameters: list[nn.Parameter]) -> None:
        """Keep a copy of `parameters` to put back with `restore`."""
        self.collected_params = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def restore(self, parameters: list[nn.Parameter]) -> None:
        """Put back the parameters saved by `store`."""
        for saved, p in zip(self.collected_params, parameters, strict=True):
            p.copy_(saved)
        self.collected_params = []
