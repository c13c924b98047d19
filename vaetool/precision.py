"""Half precision with a safety net: a model call whose fp16/bf16 output holds NaN/inf is redone in fp32.

SDXL's VAE (and any model whose activations overflow fp16) returns NaN or black images in half
precision. Every command runs its model calls through one `Fp32Fallback`: the call is made on
the half-precision model; when its output is not finite, the same call is redone on an fp32 copy
of the weights (made once, on first need), a note is given once, and the redos are counted.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from vaetool.api import Vae

__all__ = ["HALF_DTYPES", "Fp32Fallback", "fp32_copy", "is_finite"]

HALF_DTYPES = (torch.float16, torch.bfloat16)


def fp32_copy(vae: Vae) -> Vae:
    """The same VAE with float32 weights (a separate copy: the half-precision one stays as it is)."""
    from vaetool.api import Vae as VaeClass

    return VaeClass(copy.deepcopy(vae.model).float(), vae.latent_format, dict(vae.source), parts=vae.parts)


def is_finite(out: torch.Tensor) -> bool:
    """Whether every value of `out` is finite."""
    return bool(torch.isfinite(out).all())


class Fp32Fallback:
    """Run `call(vae)`; when a half-precision model's output is not finite, redo it as `call(fp32 copy)`."""

    def __init__(self, vae: Vae, notice: Callable[[str], None] | None = None) -> None:
        self.vae, self.notice = vae, notice
        self.fp32: Vae | None = None
        self.retries = 0

    def __call__(self, call: Callable[[Vae], torch.Tensor], what: str = "a batch") -> torch.Tensor:
        """call(vae), or call(fp32 copy) when that is not finite; the caller decides what a still non-finite output means."""
        out = call(self.vae)
        if self.vae.dtype not in HALF_DTYPES or is_finite(out):
            return out
        return call(self.redo(what))

    def redo(self, what: str) -> Vae:
        """The fp32 copy to redo `what` with (made once, with the notice), counted as a retry."""
        if self.fp32 is None:
            self.fp32 = fp32_copy(self.vae)
            if self.notice is not None:
                self.notice(f"NaN/inf in the half-precision output for {what}: redoing it in fp32 "
                            "(and any later such output; counted as fp32_retries)")
        self.retries += 1
        return self.fp32
