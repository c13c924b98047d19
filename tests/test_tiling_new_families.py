"""Wan 2.1 / Qwen-Image, Flux.2 and TAESD through the tiling front door: exact tiles equal untiled, fast tiles stay
within their measured error, auto tiles under a small budget, and the planner's estimates grow with size and batch."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vaetool import memory, tiling
from vaetool.api import load_vae
from vaetool.cli import app
from vaetool.errors import MemoryBudgetError
from vaetool.tiling import Choice, Tiling

REPO = Path(__file__).resolve().parent.parent
TINY = ("tiny-wan", "tiny-flux2", "tiny-taesd")
FULL = ("wan", "flux2", "taesd", "qwen-image", "taesdxl")
EXACT_TOL = 1e-5  # x max(1, |untiled output|)
# Fast mode on the perturbed tiny models (seed 1), 120x136 px, batch 2, 48 px tiles, PSNR vs untiled over its range,
# measured encode / decode: tiny-wan 28.7 / 28.4, tiny-flux2 22.7 / 25.1, tiny-taesd 37.1 / 45.9 dB. Floors ~2 dB below.
FAST_MIN_DB = {"tiny-wan": (26.5, 26.5), "tiny-flux2": (20.5, 23.0), "tiny-taesd": (35.0, 44.0)}
# Through the CLI (the seeded tiny models), 128x96 photo, --tile fast --tile-size 32 against --tile off, 8-bit PNGs,
# measured: tiny-wan 47.2, tiny-flux2 7.4, tiny-taesd 64.2 dB. Flux.2's GroupNorm statistics from 4 x 4 latent px
# tiles are poor, as for the SD family (tiny-f8 at the same setting: 9.6 dB; 64 px tiles: 19.5 and 19.1 dB).
CLI_MIN_DB = {"tiny-wan": 45.0, "tiny-flux2": 6.5, "tiny-taesd": 62.0}


@pytest.fixture(scope="module")
def models(perturb) -> dict[str, torch.nn.Module]:
    return {name: perturb(load_vae(name).model, seed=1) for name in TINY}


def _image(batch: int, height: int, width: int) -> torch.Tensor:
    """Smooth colour gradients plus noise, [B, 3, H, W] in about [-1, 1]."""
    gen = torch.Generator().manual_seed(2)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    img = torch.stack([torch.sin(3 * xx + yy), torch.cos(2 * yy - xx), xx * yy])[None] * 0.8  # [1, 3, H, W]
    return img + 0.1 * torch.randn(batch, 3, height, width, generator=gen)


def _untiled(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(moments, latent mean, decoded mean) of the plain forward."""
    with torch.inference_mode():
        moments = model.encode_moments(x)
        z = moments[:, : moments.shape[1] // 2]
        return moments, z, model.decode(z)


def _psnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    mse = (out.double() - ref.double()).square().mean().item()
    rng = (ref.max() - ref.min()).item()
    return math.inf if mse == 0 else 10 * math.log10(rng * rng / mse)


def _assert_exact(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= EXACT_TOL * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("name", TINY)
def test_the_families_are_plannable(models: dict, name: str) -> None:
    assert tiling.plannable(models[name])
    assert memory.architecture(models[name]) == memory.architecture(name)  # a loaded model and its config agree


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("tile", [24, 40])
def test_exact_equals_untiled(models: dict, name: str, tile: int) -> None:
    model = models[name]
    x = _image(2, 72, 88)
    moments, z, decoded = _untiled(model, x)
    _assert_exact(tiling.encode(model, x, Tiling("exact", tile)), moments)
    z = z[:, :, :-1, 1:]  # odd latent sizes (8 x 10): no tile divides the image
    with torch.inference_mode():
        ref = model.decode(z)
    _assert_exact(tiling.decode(model, z, Tiling("exact", tile)), ref)
    assert decoded.shape[2:] == (72, 88)


@pytest.mark.parametrize("name", TINY)
def test_fast_is_close_to_untiled(models: dict, name: str) -> None:
    model = models[name]
    x = _image(2, 120, 136)
    moments, z, decoded = _untiled(model, x)
    c = z.shape[1]
    enc_db, dec_db = FAST_MIN_DB[name]
    encoded = tiling.encode(model, x, Tiling("fast", 48))
    assert encoded.shape == moments.shape
    assert _psnr(encoded[:, :c], moments[:, :c]) >= enc_db
    out = tiling.decode(model, z, Tiling("fast", 48))
    assert out.shape == decoded.shape
    assert _psnr(out, decoded) >= dec_db


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("direction", ["encode", "decode"])
def test_auto_tiles_under_a_small_budget(models: dict, name: str, direction: str) -> None:
    model, size = models[name], 192
    x = _image(1, size, size)
    moments, z, decoded = _untiled(model, x)
    data, ref = (x, moments) if direction == "encode" else (z, decoded)
    untiled = memory.estimate_peak(model, direction, size, size)
    smallest = memory.estimate_tile_peak(model, direction, 64, mode="fast", height=size, width=size)
    assert smallest < untiled
    assert tiling.choose(model, direction, 1, size, size, Tiling("auto", max_memory=2 * untiled)) == Choice("off", None, 1)
    budget = (smallest + untiled) // 2
    choice = tiling.choose(model, direction, 1, size, size, Tiling("auto", max_memory=budget))
    assert choice.mode in ("exact", "fast") and choice.tile_size is not None and choice.tile_size < size, choice
    run = tiling.encode if direction == "encode" else tiling.decode
    out = run(model, data, Tiling("auto", max_memory=budget))
    if choice.mode == "exact":
        _assert_exact(out, ref)
    else:
        assert _psnr(out, ref) >= min(FAST_MIN_DB[name])
    with pytest.raises(MemoryBudgetError, match="too small") as err:
        tiling.choose(model, direction, 1, size, size, Tiling("auto", max_memory=smallest // 2))
    needed = str(err.value).rsplit("needs ", 1)[1]
    assert tiling.choose(model, direction, 1, size, size, Tiling("fast", max_memory=needed.replace(" ", ""))).mode == "fast"


@pytest.mark.parametrize("config", FULL + TINY)
@pytest.mark.parametrize("op", ["encode", "decode"])
def test_estimates_grow_with_size_and_batch(config: str, op: str) -> None:
    arch = memory.architecture(config)
    sizes = [memory.estimate_peak(arch, op, s, s) for s in (64, 128, 256, 512, 1024)]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes), sizes
    batches = [memory.estimate_peak(arch, op, 256, 256, b) for b in (1, 2, 3, 4)]
    assert batches == sorted(batches) and len(set(batches)) == len(batches), batches
    tiles = [memory.estimate_tile_peak(arch, op, t, height=1024, width=1024) for t in (64, 128, 256, 512)]
    assert tiles == sorted(tiles) and tiles[-1] < sizes[-1], tiles


def test_wan_1024_plan_tiles_under_half_its_untiled_estimate_and_names_the_smallest_budget() -> None:
    untiled = memory.estimate_peak("wan", "decode", 1024, 1024)
    plan = memory.plan("wan", "decode", 1024, 1024, max_memory=untiled // 2)
    assert not plan.fits_untiled and plan.tile is not None and plan.estimate <= untiled // 2
    with pytest.raises(MemoryBudgetError, match=r"the smallest tile \(64 px, fast mode\) needs"):
        memory.plan("wan", "decode", 1024, 1024, max_memory="64MiB")


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.float64)


@pytest.mark.parametrize("name", TINY)
def test_cli_decodes_a_latent_file_with_fast_tiles(runner, ran, tmp_path: Path, name: str) -> None:
    photo = tmp_path / "cat.png"
    Image.open(REPO / "examples/images/chelsea.png").convert("RGB").resize((128, 96)).save(photo)
    result = runner.invoke(app, ["encode", str(photo), "-o", str(tmp_path / "lat"), "-m", name, "-q"])
    assert result.exit_code == 0, result.stderr
    latent = tmp_path / "lat" / "cat.safetensors"
    ran.clear()  # the encode's calls
    for tile, out in ((["--tile", "fast", "--tile-size", "32"], "fast"), (["--tile", "off"], "off")):
        result = runner.invoke(app, ["decode", str(latent), "-o", str(tmp_path / out), "-m", name, *tile, "-q"])
        assert result.exit_code == 0, result.stderr
    assert ran == [("decode", "fast", 32), ("decode", "off", None)]
    fast, off = _png(tmp_path / "fast" / "cat.png"), _png(tmp_path / "off" / "cat.png")
    assert fast.shape == off.shape == (96, 128, 3)
    mse = float(np.mean((fast - off) ** 2))
    db = math.inf if mse == 0 else 10 * math.log10(255**2 / mse)
    assert db >= CLI_MIN_DB[name]
