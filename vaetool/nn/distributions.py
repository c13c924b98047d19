"""The diagonal Gaussian posterior of a KL autoencoder, the regularizer that samples it, and the identity regularizer."""

from __future__ import annotations

import torch
from torch import nn


class DiagonalGaussianDistribution:
    """A Gaussian with diagonal covariance from `parameters` = cat([mean, logvar], dim=1)."""

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False) -> None:
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)  # [B, z, h, w] each
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)
        if deterministic:
            self.var = self.std = torch.zeros_like(self.mean)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw mean + std * eps, with eps from `generator` when given (reproducible)."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        """The posterior mode (its mean)."""
        return self.mean

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """KL divergence to N(0, I) (or to `other`), summed over all but the batch dim: [B]."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device)
        dims = list(range(1, self.mean.ndim))
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)
        return 0.5 * torch.sum(
            (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar,
            dim=dims,
        )

    def nll(self, sample: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of `sample`, summed over all but the batch dim."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device)
        log2pi = torch.log(torch.tensor(2.0 * torch.pi))
        dims = list(range(1, sample.ndim))
        return 0.5 * torch.sum(log2pi + self.logvar + (sample - self.mean).pow(2) / self.var, dim=dims)


class DiagonalGaussianRegularizer(nn.Module):
    """Turns encoder moments into a latent (a sample, or the mode) and logs the KL loss."""

    def __init__(self, sample: bool = True) -> None:
        super().__init__()
        self.sample = sample

    def get_trainable_parameters(self) -> list[nn.Parameter]:
        """The regularizer has no trainable parameters."""
        return []

    def forward(
        self, z: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        posterior = DiagonalGaussianDistribution(z)
        latent = posterior.sample(generator) if self.sample else posterior.mode()
        kl = posterior.kl()  # [B]
        return latent, {"kl_loss": kl.sum() / kl.shape[0]}


class IdentityRegularizer(nn.Module):
    """sgm's IdentityRegularizer: the encoder output is the latent as is (no KL, nothing logged)."""

    def get_trainable_parameters(self) -> list[nn.Parameter]:
        """The regularizer has no trainable parameters."""
        return []

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return z, {}
