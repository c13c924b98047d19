"""Tiled encode/decode: exact mode equals untiled, fast mode's error is bounded, auto plans and retries."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from vaetool import memory, tiling
from vaetool.api import load_vae
from vaetool.errors import ConfigError, MemoryBudgetError, VaeToolError
from vaetool.tiling import Tiling
from vaetool.tiling.fast import ramp, windows
from vaetool.tiling.program import decoder_program, encoder_program

EXACT_TOL = 1e-4
# Fast mode on the perturbed tiny models at 96x128 px, batch 2, 48 px tiles, measured: decode
# 22.7 (tiny-f8), 24.1 (16ch), 34.1 (f4), 27.9 (svd) dB; encode 22.3, 22.9, 30.1, 23.1 dB. The
# floors sit below the lowest; the perturbed tiny models are far harsher than SD-sized weights.
FAST_MIN_PSNR = {"decode": 20.0, "encode": 20.0}


def _perturbed(name: str) -> torch.nn.Module:
    """A tiny model whose weights get 0.05*randn added, so GroupNorm and convs do not look trivial."""
    model = load_vae(name).model
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {name: _perturbed(name) for name in ("tiny-f8", "tiny-f8-16ch", "tiny-f4", "tiny-svd")}


def _image(batch: int, height: int, width: int) -> torch.Tensor:
    """Smooth colour gradients plus noise, [B, 3, H, W] in about [-1, 1]."""
    gen = torch.Generator().manual_seed(2)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    img = torch.stack([torch.sin(3 * xx + yy), torch.cos(2 * yy - xx), xx * yy])[None] * 0.8  # [1, 3, H, W]
    return img + 0.1 * torch.randn(batch, 3, height, width, generator=gen)


def _latent(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        moments = model.encode_moments(x)
    return moments[:, : moments.shape[1] // 2]


def _psnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    mse = (out.double() - ref.double()).square().mean().item()
    rng = (ref.max() - ref.min()).item()
    return math.inf if mse == 0 else 10 * math.log10(rng * rng / mse)


# ---------------------------------------------------------------- exact mode


@pytest.mark.parametrize("name,tile", [("tiny-f8", 40), ("tiny-f8-16ch", 24), ("tiny-f4", 40)])
def test_exact_encode_equals_untiled(models: dict, name: str, tile: int) -> None:
    model = models[name]
    x = _image(2, 75, 90)  # odd sizes; neither tile divides them
    with torch.inference_mode():
        ref = model.encode_moments(x)
    out = tiling.encode_exact(model, x, tile_size=tile)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= EXACT_TOL


@pytest.mark.parametrize("name,tile", [("tiny-f8", 24), ("tiny-f8-16ch", 40), ("tiny-f4", 24)])
def test_exact_decode_equals_untiled(models: dict, name: str, tile: int) -> None:
    model = models[name]
    z = _latent(model, _image(2, 72, 88))
    z = z[:, :, :-1, 1:]  # odd latent sizes: 8 x 10 (f8), 17 x 21 (f4); neither tile divides the image
    with torch.inference_mode():
        ref = model.decode(z)
    out = tiling.decode_exact(model, z, tile_size=tile)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= EXACT_TOL


def test_exact_decode_video_clips(models: dict) -> None:
    """Two clips of two frames: the temporal layers mix frames within a clip, tiled spatially."""
    model = models["tiny-svd"]
    z = _latent(model, _image(4, 56, 72))
    with torch.inference_mode():
        ref = model.decode(z, timesteps=2)
    out = tiling.decode_exact(model, z, tile_size=32, timesteps=2)
    assert (out - ref).abs().max().item() <= EXACT_TOL


def test_exact_tiles_differ_from_per_tile_statistics(models: dict) -> None:
    """The pooled GroupNorm statistics matter: the tile grid alone would not make the test pass."""
    from vaetool.tiling.exact import run_program

    model = models["tiny-f8"]
    z = _latent(model, _image(1, 96, 96))
    program = decoder_program(model)
    with torch.inference_mode():
        ref = model.decode(z)
        quarter = run_program(program, z[:, :, :6, :6], None)  # one tile with its own statistics
    assert (quarter - ref[:, :, :48, :48]).abs().max().item() > 1e-2


@pytest.mark.parametrize("bn_kernel", [True, False])
def test_tile_statistics_match_float64(monkeypatch: pytest.MonkeyPatch, bn_kernel: bool) -> None:
    """A strided tile of a batch: per-sample, per-channel mean and M2 as float64 var_mean gives them (both kernels)."""
    from vaetool.nn import groupstats

    if not bn_kernel:
        monkeypatch.setattr(groupstats, "BN_STATS_DEVICES", frozenset())  # the var_mean path other devices take
    gen = torch.Generator().manual_seed(3)
    t = (torch.randn(3, 8, 40, 50, generator=gen) * 3 + 20)[:, :, 3:31, 5:47]  # a view, not contiguous; mean >> std
    stats = groupstats.Stats.of(t)
    var, mean = torch.var_mean(t.double(), dim=(2, 3), correction=0)  # [3, 8] each
    assert stats.count == 28 * 42
    assert torch.allclose(stats.mean, mean, rtol=1e-6, atol=0)
    assert torch.allclose(stats.m2 / stats.count, var, rtol=1e-5, atol=0)


def test_programs_cover_every_op(models: dict) -> None:
    model = models["tiny-f8"]
    enc, dec = encoder_program(model), decoder_program(model)
    assert enc.factor == 1 / 8 and dec.factor == 8
    assert enc.output == enc.ops[-1].out and dec.output == dec.ops[-1].out


# ---------------------------------------------------------------- fast mode


@pytest.mark.parametrize("name", ["tiny-f8", "tiny-f4", "tiny-svd"])
def test_fast_decode_within_documented_psnr(models: dict, name: str) -> None:
    model = models[name]
    z = _latent(model, _image(2, 96, 128))
    kw = {"timesteps": 2} if name == "tiny-svd" else {}
    with torch.inference_mode():
        ref = model.decode(z, **kw)
    out = tiling.decode_fast(model, z, tile_size=48, **kw)
    assert out.shape == ref.shape
    assert _psnr(out, ref) >= FAST_MIN_PSNR["decode"]


@pytest.mark.parametrize("name", ["tiny-f8-16ch", "tiny-f4"])
def test_fast_encode_within_documented_psnr(models: dict, name: str) -> None:
    model = models[name]
    x = _image(2, 96, 128)
    with torch.inference_mode():
        ref = model.encode_moments(x)
    out = tiling.encode_fast(model, x, tile_size=48)
    assert out.shape == ref.shape
    assert _psnr(out, ref) >= FAST_MIN_PSNR["encode"]


def test_fast_with_exact_statistics_is_nearly_exact(models: dict) -> None:
    """With the statistics of the whole input, fast mode's only error is at tile edges (small)."""
    model = models["tiny-f8"]
    z = _latent(model, _image(1, 96, 128))
    with torch.inference_mode():
        ref = model.decode(z)
    out = tiling.decode_fast(model, z, tile_size=48, overlap=32, stats_pixels=10**9)
    assert _psnr(out, ref) >= 50.0


@pytest.mark.parametrize("n,tile,overlap,align", [(100, 30, 8, 1), (13, 5, 2, 1), (90, 32, 16, 8), (90, 40, 30, 8), (20, 40, 8, 1)])
def test_windows_cover_and_ramps_sum_to_one(n: int, tile: int, overlap: int, align: int) -> None:
    wins = windows(n, tile, overlap, align)
    assert wins[0][0] == 0 and wins[-1][1] == n
    assert all(lo % align == 0 for lo, _ in wins)
    assert all(b[0] < a[1] for a, b in itertools.pairwise(wins))  # neighbours overlap
    total = torch.zeros(n)
    for i, (lo, hi) in enumerate(wins):
        left = 0 if i == 0 else wins[i - 1][1] - lo
        right = 0 if i == len(wins) - 1 else hi - wins[i + 1][0]
        total[lo:hi] += ramp(hi - lo, left, right)
    assert torch.allclose(total, torch.ones(n), atol=1e-6)


# ---------------------------------------------------------------- auto: planner, retry, budget errors


def _tiling_budget(model: torch.nn.Module, op: str, size: int, batch: int) -> int:
    """A budget below the untiled estimate of `batch` images that an exact 64 px tiling fits."""
    untiled = memory.estimate_peak(model, op, size, size, batch)
    tiled = memory.estimate_tile_peak(model, op, 64, batch, mode="exact", height=size, width=size)
    assert tiled < untiled, "the tiny model must need less memory tiled than untiled"
    return (tiled + untiled) // 2


def test_auto_small_budget_tiles_and_agrees(models: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    model = models["tiny-f8"]
    z = _latent(model, _image(2, 128, 128))
    with torch.inference_mode():
        ref = model.decode(z)
    used: list[tuple[str, int | None]] = []
    for mode in ("off", "exact", "fast"):
        real = tiling.RUNNERS[("decode", mode)]
        monkeypatch.setitem(tiling.RUNNERS, ("decode", mode),
                            lambda m, t, ts, ov, tt, mode=mode, real=real: used.append((mode, ts)) or real(m, t, ts, ov, tt))
    out = tiling.decode(model, z, Tiling(max_memory=_tiling_budget(model, "decode", 128, 1)))
    assert used and all(mode == "exact" and ts is not None and ts < 128 for mode, ts in used)
    assert (out - ref).abs().max().item() <= EXACT_TOL
    used.clear()
    tiling.decode(model, z, Tiling(max_memory="1GiB"))
    assert [mode for mode, _ in used] == ["off"]


def test_auto_encode_small_budget_agrees(models: dict) -> None:
    model = models["tiny-f8-16ch"]
    x = _image(2, 128, 128)
    with torch.inference_mode():
        ref = model.encode_moments(x)
    out = tiling.encode(model, x, Tiling(max_memory=_tiling_budget(model, "encode", 128, 1)))
    assert (out - ref).abs().max().item() <= EXACT_TOL


def test_out_of_memory_is_retried_with_smaller_tiles(models: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    model = models["tiny-f8"]
    z = _latent(model, _image(2, 128, 128))
    with torch.inference_mode():
        ref = model.decode(z)
    calls: list[tuple[str, int | None, int]] = []
    real = dict(tiling.RUNNERS)

    def flaky(mode: str):
        def run(m, t, ts, ov, tt):
            calls.append((mode, ts, t.shape[0]))
            if len(calls) == 1:
                raise torch.OutOfMemoryError("simulated: out of memory")
            return real[("decode", mode)](m, t, ts, ov, tt)
        return run

    for mode in ("off", "exact"):
        monkeypatch.setitem(tiling.RUNNERS, ("decode", mode), flaky(mode))
    out = tiling.decode(model, z, Tiling("exact", 128))
    assert [(m, ts) for m, ts, _ in calls] == [("exact", 128), ("exact", 64)]
    assert all(n == 2 for _, _, n in calls)  # the whole batch, nothing lost
    assert (out - ref).abs().max().item() <= EXACT_TOL

    calls.clear()
    out = tiling.decode(model, z, Tiling(max_memory="1GiB"))  # planned untiled, fails once, goes tiled
    assert calls[0][0] == "off" and calls[1][0] == "exact" and calls[1][1] == 64
    assert (out - ref).abs().max().item() <= EXACT_TOL


def test_out_of_memory_at_the_smallest_tile_is_a_budget_error(models: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    def always(m, t, ts, ov, tt):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setitem(tiling.RUNNERS, ("decode", "fast"), always)
    z = torch.zeros(1, 4, 16, 16)
    with pytest.raises(MemoryBudgetError, match=r"smallest tile \(64 px\).*needs about"):
        tiling.decode(models["tiny-f8"], z, Tiling("fast", 128))


def test_budget_too_small_names_the_smallest_budget(models: dict) -> None:
    z = torch.zeros(1, 4, 32, 32)
    with pytest.raises(VaeToolError, match=r"too small.*smallest tile.*needs \d"):
        tiling.decode(models["tiny-f8"], z, Tiling(max_memory="1MiB"))


def test_bad_tiling_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown tiling mode 'tiles'"):
        Tiling("tiles")
    with pytest.raises(ConfigError, match="max-memory"):
        Tiling(max_memory="lots")
    with pytest.raises(ConfigError, match="below the smallest"):
        Tiling("exact", 8)


def test_explicit_fast_mode_plans_fast_tiles(models: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """--tile fast with a budget too small for any exact tile still runs: the planner is asked for fast tiles."""
    model = models["tiny-f8"]
    z = _latent(model, _image(1, 256, 256))
    exact_min = memory.estimate_tile_peak(model, "decode", 64, 1, mode="exact", height=256, width=256)
    fast_min = memory.estimate_tile_peak(model, "decode", 64, 1, mode="fast", height=256, width=256)
    assert fast_min < exact_min
    budget = (fast_min + exact_min) // 2
    with pytest.raises(MemoryBudgetError):
        tiling.choose(model, "decode", 1, 256, 256, Tiling("exact", max_memory=budget))
    choice = tiling.choose(model, "decode", 1, 256, 256, Tiling("fast", max_memory=budget))
    assert choice.mode == "fast" and choice.tile_size is not None and choice.tile_size < 256
    assert tiling.choose(model, "decode", 1, 256, 256, Tiling(max_memory=budget)).mode == "fast"  # auto falls back to fast
    out = tiling.decode(model, z, Tiling("fast", max_memory=budget))
    assert out.shape == (1, 3, 256, 256) and torch.isfinite(out).all()


def test_off_never_tiles_even_out_of_memory(models: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    def oom(m, t, ts, ov, tt):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setitem(tiling.RUNNERS, ("decode", "off"), oom)
    with pytest.raises(MemoryBudgetError, match=r"untiled \(--tile off\)"):
        tiling.decode(models["tiny-f8"], torch.zeros(1, 4, 8, 8), Tiling("off"))
