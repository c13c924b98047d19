"""Beta schedules and DDIM parameters against diffusers' DDPMScheduler / DDIMScheduler; hand values for the rest;
the small util helpers and HybridConditioner."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vaetool.config import instantiate_from_config
from vaetool.nn.schedules import (
    betas_for_alpha_bar,
    extract_into_tensor,
    make_beta_schedule,
    make_ddim_sampling_parameters,
    make_ddim_timesteps,
)
from vaetool.nn.util import avg_pool_nd, default, exists, init_, max_neg_value, mean_flat, noise_like, scale_module, uniq, zero_module

diffusers = pytest.importorskip("diffusers")

SD = {"linear_start": 0.00085, "linear_end": 0.012}  # the SD1/SD2 schedule


@pytest.mark.parametrize(("ours", "theirs"), [("linear", "scaled_linear"), ("sqrt_linear", "linear"),
                                              ("cosine", "squaredcos_cap_v2"), ("squaredcos_cap_v2", "squaredcos_cap_v2")])
@pytest.mark.parametrize("n", [1000, 37])
def test_betas_and_alphas_cumprod_match_ddpm_scheduler(ours: str, theirs: str, n: int) -> None:
    ref = diffusers.DDPMScheduler(num_train_timesteps=n, beta_start=SD["linear_start"], beta_end=SD["linear_end"],
                                  beta_schedule=theirs)
    betas = make_beta_schedule(ours, n, **SD)
    assert betas.dtype == np.float64 and betas.shape == (n,)
    assert np.abs(betas - ref.betas.double().numpy()).max() <= 1e-6
    assert np.abs(np.cumprod(1 - betas) - ref.alphas_cumprod.double().numpy()).max() <= 1e-5


def test_sqrt_schedule_and_alpha_bar_by_hand() -> None:
    assert np.allclose(make_beta_schedule("sqrt", 5, 0.01, 0.09), np.sqrt([0.01, 0.03, 0.05, 0.07, 0.09]))
    betas = betas_for_alpha_bar(4, lambda t: 1 - t, max_beta=0.6)  # alpha_bar 1, .75, .5, .25, 0
    assert np.allclose(betas, [0.25, 1 / 3, 0.5, 0.6])
    with pytest.raises(ValueError, match="'quadratic' is unknown"):
        make_beta_schedule("quadratic", 10)


def _ddim(n_steps: int, total: int = 1000) -> object:
    ref = diffusers.DDIMScheduler(num_train_timesteps=total, beta_start=SD["linear_start"], beta_end=SD["linear_end"],
                                  beta_schedule="scaled_linear", set_alpha_to_one=False, steps_offset=1,
                                  timestep_spacing="leading", clip_sample=False)
    ref.set_timesteps(n_steps)
    return ref


def _ddim_sigma(ref: object, t: int, eta: float) -> float:
    """DDIM's sigma_t, read off one step: zero model output and sample, unit variance noise."""
    zero = torch.zeros(1, 1)
    return float(ref.step(zero, t, zero, eta=eta, variance_noise=torch.ones(1, 1)).prev_sample)


@pytest.mark.parametrize("n_steps", [50, 10, 7])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_timesteps_and_sigmas_match_ddim_scheduler(n_steps: int, eta: float) -> None:
    ref = _ddim(n_steps)
    steps = make_ddim_timesteps("uniform", n_steps, 1000)
    assert steps.tolist() == sorted(ref.timesteps.tolist())
    alphacums = np.cumprod(1 - make_beta_schedule("linear", 1000, **SD))
    sigmas, alphas, alphas_prev = make_ddim_sampling_parameters(alphacums, steps, eta)
    assert np.abs(alphas - ref.alphas_cumprod[steps].double().numpy()).max() <= 1e-6
    assert alphas_prev[0] == alphacums[0] and np.array_equal(alphas_prev[1:], alphas[:-1])
    expected = [_ddim_sigma(ref, int(t), eta) for t in steps]
    assert np.abs(sigmas - np.array(expected)).max() <= 1e-5
    assert (sigmas == 0).all() == (eta == 0.0)


def test_ddim_quad_and_bad_requests_by_hand() -> None:
    steps = make_ddim_timesteps("quad", 4, 100)  # linspace(0, sqrt(80), 4)**2 = 0, 8.9, 35.6, 80
    assert steps.tolist() == [1, 9, 36, 81]
    assert make_ddim_timesteps("uniform", 3, 10).tolist() == [1, 4, 7]  # exactly 3 steps (upstream's range gives 4)
    with pytest.raises(ValueError, match="'cubic' is unknown"):
        make_ddim_timesteps("cubic", 4, 100)
    with pytest.raises(ValueError, match=r"num_ddim_timesteps must be in 1\.\.10"):
        make_ddim_timesteps("uniform", 11, 10)
    with pytest.raises(ValueError, match="past the 10 cumulative alphas"):
        make_ddim_sampling_parameters(np.linspace(0.9, 0.1, 10), np.array([1, 10]), 0.0)


def test_extract_into_tensor() -> None:
    a = torch.tensor([10.0, 11.0, 12.0, 13.0])
    out = extract_into_tensor(a, torch.tensor([3, 0]), (2, 4, 5, 5))
    assert out.shape == (2, 1, 1, 1) and out.flatten().tolist() == [13.0, 10.0]


def test_module_helpers() -> None:
    conv = torch.nn.Conv2d(2, 3, 3)
    w = conv.weight.detach().clone()
    assert scale_module(conv, 0.5) is conv and torch.allclose(conv.weight, 0.5 * w)
    assert zero_module(conv) is conv and all((p == 0).all() for p in conv.parameters())
    x = torch.arange(24.0).reshape(2, 3, 4)
    assert mean_flat(x).tolist() == [5.5, 17.5]
    assert [type(avg_pool_nd(d, 2)) for d in (1, 2, 3)] == [torch.nn.AvgPool1d, torch.nn.AvgPool2d, torch.nn.AvgPool3d]
    assert avg_pool_nd(2, kernel_size=2, stride=2)(torch.ones(1, 1, 4, 4)).shape == (1, 1, 2, 2)
    with pytest.raises(ValueError, match="unsupported dimensions: 4"):
        avg_pool_nd(4, 2)


def test_noise_like() -> None:
    torch.manual_seed(1)
    fresh = noise_like((3, 2, 5), "cpu")
    same = noise_like((3, 2, 5), "cpu", repeat=True)
    assert fresh.shape == same.shape == (3, 2, 5)
    assert not torch.equal(fresh[0], fresh[1]) and torch.equal(same[0], same[2])
    assert abs(float(noise_like((20000,), "cpu").std()) - 1) < 0.05


def test_hybrid_conditioner_from_config() -> None:
    cond = instantiate_from_config({"target": "ldm.modules.diffusionmodules.util.HybridConditioner", "params": {
        "c_concat_config": {"target": "torch.nn.Identity"},
        "c_crossattn_config": {"target": "torch.nn.Conv2d", "params": {"in_channels": 2, "out_channels": 4, "kernel_size": 1}}}})
    a, b = torch.randn(1, 3, 2, 2), torch.randn(1, 2, 2, 2)
    out = cond(a, b)
    assert set(out) == {"c_concat", "c_crossattn"}
    assert out["c_concat"][0] is a and torch.allclose(out["c_crossattn"][0], cond.crossattn_conditioner(b))
    assert math.isclose(sum(p.numel() for p in cond.parameters()), 4 * 2 + 4)


def test_small_helpers() -> None:
    assert exists(0) and not exists(None)
    assert default(None, 3) == 3 and default(0, 3) == 0
    assert uniq([3, 1, 3, 2, 1]) == [3, 1, 2]
    assert max_neg_value(torch.zeros(1, dtype=torch.float16)) == -65504.0
    w = init_(torch.empty(200, 16))
    assert w.abs().max() <= 0.25 and w.std() > 0.1  # U(-1/4, 1/4): std 0.144
