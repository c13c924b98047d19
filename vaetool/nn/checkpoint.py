"""Gradient checkpointing: run a block without keeping its activations; recompute them in backward.

`checkpoint(func, inputs, params, flag)` is the seeds' interface (sgm/ldm `util.checkpoint`):
`params` are the tensors `func` uses without taking them as arguments (its module's parameters),
so their gradients flow through the recomputation. CheckpointFunction is the autograd function
behind it; unlike the seed's it also restores the random state for the recomputation (dropout
draws the same mask twice, so the gradients are those of the forward that ran) and differentiates
only the inputs and parameters that require grad (a frozen encoder is fine).

`set_gradient_checkpointing(model, True)` switches it on for every module that supports it (the
coders, the DDPM Model and the transformer blocks); `vaetool train` does so for `gradient_checkpointing: true`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

AUTOCAST_DEVICES = ("cuda", "cpu")


def _autocast_state() -> dict[str, tuple[bool, torch.dtype]]:
    """Whether autocast is on, and in which dtype, per device type (the recomputation repeats it)."""
    return {d: (torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in AUTOCAST_DEVICES}


class CheckpointFunction(torch.autograd.Function):
    """Forward without autograd; backward reruns `run_function` with autograd and differentiates it."""

    @staticmethod
    def forward(ctx: Any, run_function: Callable[..., Any], length: int, *args: Any) -> Any:
        ctx.run_function = run_function
        ctx.input_tensors = list(args[:length])
        ctx.input_params = list(args[length:])
        ctx.autocast = _autocast_state()
        ctx.cuda_devices = sorted({t.device.index or 0 for t in args if isinstance(t, torch.Tensor) and t.is_cuda})
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = [torch.cuda.get_rng_state(d) for d in ctx.cuda_devices]
        with torch.no_grad():
            return ctx.run_function(*ctx.input_tensors)

    @staticmethod
    def backward(ctx: Any, *output_grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        with torch.random.fork_rng(devices=ctx.cuda_devices), torch.enable_grad():
            # detached copies that require grad exactly where the originals do; view_as (made with
            # autograd on) keeps an in-place op in run_function from touching the saved tensors
            inputs = [t.detach().requires_grad_(t.requires_grad).view_as(t) if isinstance(t, torch.Tensor) else t
                      for t in ctx.input_tensors]
            torch.set_rng_state(ctx.cpu_rng)
            for device, state in zip(ctx.cuda_devices, ctx.cuda_rng, strict=True):
                torch.cuda.set_rng_state(state, device)
            with contextlib.ExitStack() as stack:
                for device_type, (enabled, dtype) in ctx.autocast.items():
                    if enabled:  # the forward ran under autocast: so does the recomputation
                        stack.enter_context(torch.autocast(device_type, dtype=dtype))
                outputs = ctx.run_function(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        wanted = [t for t in (*inputs, *ctx.input_params) if isinstance(t, torch.Tensor) and t.requires_grad]
        pairs = [(o, g) for o, g in zip(outputs, output_grads, strict=True) if isinstance(o, torch.Tensor) and o.requires_grad]
        grads = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
                     if pairs and wanted else ())
        result = [next(grads) if isinstance(t, torch.Tensor) and t.requires_grad else None
                  for t in (*inputs, *ctx.input_params)]
        del ctx.input_tensors, ctx.input_params, outputs
        return (None, None, *result)


def checkpoint(func: Callable[..., Any], inputs: Sequence[Any], params: Iterable[torch.Tensor], flag: bool) -> Any:
    """func(*inputs), without keeping its activations when `flag` and autograd is on (params: what func reads besides inputs)."""
    if flag and torch.is_grad_enabled():
        inputs = tuple(inputs)
        return CheckpointFunction.apply(func, len(inputs), *inputs, *tuple(params))
    return func(*inputs)


def run_checkpointed(module: nn.Module, flag: bool, *inputs: Any, **kwargs: Any) -> Any:
    """module(*inputs, **kwargs), checkpointed when `flag` and autograd is on (parameter-free modules run as they are)."""
    if not (flag and torch.is_grad_enabled()) or next(module.parameters(), None) is None:
        return module(*inputs, **kwargs)
    params = [p for p in module.parameters() if p.requires_grad]
    return checkpoint(functools.partial(module, **kwargs) if kwargs else module, inputs, params, True)


def set_gradient_checkpointing(model: nn.Module, enabled: bool = True) -> int:
    """Set `gradient_checkpointing` on every module of `model` that has the flag; returns how many have it."""
    count = 0
    for m in model.modules():
        if hasattr(m, "gradient_checkpointing"):
            m.gradient_checkpointing = enabled
            count += 1
    return count
