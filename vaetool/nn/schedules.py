"""Diffusion noise schedules: beta schedules, DDIM step selection and its sampling parameters.

The ldm / sgm `diffusionmodules.util` functions, returning float64 NumPy arrays as upstream does
(samplers index them and convert once). Names of the beta schedules are the ldm ones; in
diffusers' terms ldm "linear" is "scaled_linear", ldm "sqrt_linear" is "linear", and ldm "cosine"
equals "squaredcos_cap_v2".
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch


def betas_for_alpha_bar(num_diffusion_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999) -> np.ndarray:
    """Betas discretising alpha_bar(t), t in [0, 1] (the cumulative product of 1 - beta), each capped at max_beta."""
    n = num_diffusion_timesteps
    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)], dtype=np.float64)


def _cosine(n: int, start: float, end: float, s: float) -> torch.Tensor:
    t = torch.arange(n + 1, dtype=torch.float64) / n + s
    alphas = torch.cos(t / (1 + s) * math.pi / 2).pow(2)  # alpha_bar, up to a constant
    return torch.clamp(1 - alphas[1:] / alphas[:-1], min=0, max=0.999)


# name -> betas(n_timestep, linear_start, linear_end, cosine_s) as float64
BETA_SCHEDULES: dict[str, Callable[[int, float, float, float], torch.Tensor]] = {
    "linear": lambda n, a, b, s: torch.linspace(a**0.5, b**0.5, n, dtype=torch.float64) ** 2,
    "cosine": _cosine,
    "squaredcos_cap_v2": lambda n, a, b, s: torch.from_numpy(
        betas_for_alpha_bar(n, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)),
    "sqrt_linear": lambda n, a, b, s: torch.linspace(a, b, n, dtype=torch.float64),
    "sqrt": lambda n, a, b, s: torch.linspace(a, b, n, dtype=torch.float64) ** 0.5,
}


def make_beta_schedule(
    schedule: str, n_timestep: int, linear_start: float = 1e-4, linear_end: float = 2e-2, cosine_s: float = 8e-3
) -> np.ndarray:
    """The `n_timestep` betas of a named schedule (see BETA_SCHEDULES) as a float64 array."""
    if schedule not in BETA_SCHEDULES:
        raise ValueError(f"beta schedule {schedule!r} is unknown; choose one of {', '.join(BETA_SCHEDULES)}")
    if n_timestep < 1:
        raise ValueError(f"n_timestep must be at least 1, got {n_timestep}")
    return BETA_SCHEDULES[schedule](n_timestep, linear_start, linear_end, cosine_s).numpy()


def _uniform(n: int, total: int) -> np.ndarray:
    # upstream takes range(0, total, total // n), which gives more than n steps when n does not
    # divide total; the first n of them are the same, and n is what the caller asked for
    return np.arange(n) * (total // n)


DDIM_DISCRETIZATIONS: dict[str, Callable[[int, int], np.ndarray]] = {
    "uniform": _uniform,
    "quad": lambda n, total: (np.linspace(0, np.sqrt(total * 0.8), n) ** 2).astype(int),
}


def make_ddim_timesteps(
    ddim_discr_method: str, num_ddim_timesteps: int, num_ddpm_timesteps: int, verbose: bool = False
) -> np.ndarray:
    """The DDPM timesteps a DDIM sampler visits, ascending, each + 1 (so the final alpha is the right one)."""
    if ddim_discr_method not in DDIM_DISCRETIZATIONS:
        raise ValueError(f"DDIM discretization {ddim_discr_method!r} is unknown; choose one of {', '.join(DDIM_DISCRETIZATIONS)}")
    if not 1 <= num_ddim_timesteps <= num_ddpm_timesteps:
        raise ValueError(f"num_ddim_timesteps must be in 1..{num_ddpm_timesteps}, got {num_ddim_timesteps}")
    steps_out = DDIM_DISCRETIZATIONS[ddim_discr_method](num_ddim_timesteps, num_ddpm_timesteps) + 1
    if verbose:
        print(f"Selected timesteps for ddim sampler: {steps_out}")
    return steps_out


def make_ddim_sampling_parameters(
    alphacums: np.ndarray, ddim_timesteps: np.ndarray, eta: float, verbose: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sigmas, alphas, alphas_prev) of DDIM at `ddim_timesteps` (arXiv 2010.02502 eq. 16; eta 0: deterministic)."""
    alphacums = np.asarray(alphacums, dtype=np.float64)
    if ddim_timesteps.max() >= len(alphacums):
        raise ValueError(f"ddim timestep {ddim_timesteps.max()} is past the {len(alphacums)} cumulative alphas")
    alphas = alphacums[ddim_timesteps]
    alphas_prev = np.asarray([alphacums[0], *alphacums[ddim_timesteps[:-1]].tolist()])
    sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    if verbose:
        print(f"Selected alphas for ddim sampler: a_t: {alphas}; a_(t-1): {alphas_prev}")
        print(f"For the chosen value of eta, which is {eta}, this results in the following sigma_t schedule for ddim sampler {sigmas}")
    return sigmas, alphas, alphas_prev


def extract_into_tensor(a: torch.Tensor, t: torch.Tensor, x_shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """a[t] per batch element, shaped [B, 1, ...] to broadcast against a tensor of `x_shape`."""
    return a.gather(-1, t).reshape(t.shape[0], *((1,) * (len(x_shape) - 1)))
