"""Tiled Wan video encode (vaetool.tiling.causal_encode) on tiny-wan: one tile is the untiled encode, several stay
within a measured floor, the planner picks off / fast / refuses by budget, and `vaetool video encode` runs it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from vaetool.api import load_vae
from vaetool.cli import app
from vaetool.errors import MemoryBudgetError
from vaetool.tiling import Choice, Tiling
from vaetool.tiling.causal_encode import encode_video_fast, plan_video_encode

MODEL = ["-m", "tiny-wan", "--device", "cpu"]


@pytest.fixture(scope="module")
def wan() -> torch.nn.Module:
    """The WanVAE the CLI builds for -m tiny-wan (random weights, seeded the same way)."""
    return load_vae("tiny-wan").model


def _clip(n: int, h: int, w: int) -> torch.Tensor:
    """A smooth moving clip [1, 3, n, h, w] in [-1, 1]."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    frames = [torch.stack([torch.sin(6 * xx + t / 2) * torch.cos(4 * yy), torch.sin(3 * yy + 2 * xx + t / 3), xx - yy]) for t in range(n)]
    return 0.8 * torch.stack(frames, dim=1)[None]  # [1, 3, n, h, w]


def _folder(path: Path, video: torch.Tensor) -> Path:
    """The clip [1, 3, n, h, w] as PNG frames; returns the folder."""
    path.mkdir()
    for t in range(video.shape[2]):
        a = ((video[0, :, t].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        Image.fromarray(a).save(path / f"f{t}.png")
    return path


def _loaded(path: Path) -> torch.Tensor:
    """A clip as the CLI reads it: its PNG frames [1, 3, n, h, w] in [-1, 1]."""
    frames = [torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1).float() / 127.5 - 1 for p in sorted(path.iterdir())]
    return torch.stack(frames, dim=1)[None]


def _psnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    return 10 * torch.log10((ref.max() - ref.min()) ** 2 / (ref - out).pow(2).mean()).item()


@pytest.mark.parametrize(("n", "tile"), [(9, 96), (9, 256), (1, 96)])
def test_one_tile_over_the_frame_is_the_untiled_encode(wan, n: int, tile: int) -> None:
    x = _clip(n, 64, 96)
    with torch.inference_mode():
        want = wan.encode_video_moments(x)  # [1, 32, T', 8, 12]
        got = encode_video_fast(wan, x, tile_size=tile)
    assert got.shape == want.shape and (got - want).abs().max().item() <= 1e-5


def test_a_one_frame_clip_in_tiles_is_the_image_fast_encode(wan) -> None:
    from vaetool.tiling.fast import encode_fast

    x = _clip(1, 64, 96)
    with torch.inference_mode():
        want = encode_fast(wan, x[:, :, 0], tile_size=32)  # [1, 32, 8, 12]
        got = encode_video_fast(wan, x, tile_size=32)[:, :, 0]
    assert (got - want).abs().max().item() <= 1e-5


def test_several_tiles_stay_within_the_measured_floor(wan) -> None:
    x = _clip(9, 64, 96)
    with torch.inference_mode():
        want = wan.encode_video_moments(x)[:, :16]  # the mean [1, 16, 3, 8, 12]
        small = encode_video_fast(wan, x, tile_size=32)[:, :16]  # 2 x 3 windows of 40 px
        wide = encode_video_fast(wan, x, tile_size=32, overlap=32)[:, :16]
    # measured 24.4 dB (frames 28.1, 21.9, 22.2: the tile edges' error travels through the caches), 42.7 with 32 px overlap
    assert 22.0 < _psnr(want, small) < 60 and _psnr(want, wide) > 40  # unweighted sums over the overlaps: 23.7 and 27.6


def test_the_planner_picks_off_fast_or_refuses_by_budget(wan) -> None:
    shape = (9, 256, 256)  # untiled needs about 51 MiB (one 4-frame chunk, the causal caches, the clip), the 64 px tile 21
    assert plan_video_encode(wan, *shape, Tiling()).mode == "off"  # the default budget: what is free
    assert plan_video_encode(wan, *shape, Tiling(max_memory="56MiB")).mode == "off"
    fast = plan_video_encode(wan, *shape, Tiling(max_memory="32MiB"))
    smaller = plan_video_encode(wan, *shape, Tiling(max_memory="24MiB"))
    assert fast.mode == smaller.mode == "fast" and fast.tile_size is not None and smaller.tile_size is not None
    assert 64 <= smaller.tile_size < fast.tile_size < 256 and fast.tile_size % 64 == 0
    with pytest.raises(MemoryBudgetError, match=r"too small to encode 9 frames of 256x256: the smallest tile \(64 px"):
        plan_video_encode(wan, *shape, Tiling(max_memory="16MiB"))
    assert plan_video_encode(wan, *shape, Tiling(mode="off", max_memory="10MiB")).mode == "off"
    assert plan_video_encode(wan, *shape, Tiling(mode="fast", max_memory="56MiB")).tile_size == 256  # fits: one tile
    exact, fast96 = Tiling(mode="exact", tile_size=96), Tiling(mode="fast", tile_size=96)  # exact is read as fast
    assert plan_video_encode(wan, *shape, exact) == plan_video_encode(wan, *shape, fast96) == Choice("fast", 96, 1)
    assert plan_video_encode(wan, 6, 250, 250, Tiling(max_memory="32MiB")) == fast  # padded to 9 frames of 256 px


def test_the_planner_sizes_bf16_as_bf16(wan) -> None:
    """bf16 weights: activations and caches at 2 bytes (measured within budget at 480x832, docs/memory.md), so larger tiles fit."""
    half = load_vae("tiny-wan", dtype=torch.bfloat16).model
    shape, budget = (9, 256, 256), Tiling(max_memory="40MiB")
    fp32, bf16 = plan_video_encode(wan, *shape, budget), plan_video_encode(half, *shape, budget)
    assert fp32.mode == "fast" and fp32.tile_size is not None
    assert bf16.mode == "off" or (bf16.tile_size is not None and bf16.tile_size > fp32.tile_size)


def test_the_cli_encodes_in_fast_tiles_and_within_a_budget(runner, tmp_path: Path, wan) -> None:
    frames = _folder(tmp_path / "in", _clip(9, 64, 96))
    lat = tmp_path / "tiled.safetensors"
    result = runner.invoke(app, ["video", "encode", str(frames), "-o", str(lat), *MODEL, "--tile", "fast", "--tile-size", "32", "--json"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["tile_mode"] == "fast" and summary["tile"] == 32 and "not used" not in result.stderr
    with torch.inference_mode():
        want = encode_video_fast(wan, _loaded(frames), tile_size=32)[:, :16]
    got = safetensors.torch.load_file(str(lat))["latent"]
    assert got.shape == (1, 16, 3, 8, 12) and (got - want).abs().max().item() <= 1e-5

    result = runner.invoke(app, ["video", "encode", str(frames), "-o", str(tmp_path / "off.safetensors"), *MODEL, "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["tile_mode"] == "off"
    big = _folder(tmp_path / "big", _clip(5, 128, 192))
    budget = "12MiB"  # 5 frames of 128x192: untiled needs about 16 MiB by the estimate, 64 px tiles fit
    choice = plan_video_encode(wan, 5, 128, 192, Tiling(max_memory=budget))
    assert choice.mode == "fast" and choice.tile_size is not None
    lat = tmp_path / "budget.safetensors"
    result = runner.invoke(app, ["video", "encode", str(big), "-o", str(lat), *MODEL, "--max-memory", budget, "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["tile"] == choice.tile_size
    with torch.inference_mode():
        want = encode_video_fast(wan, _loaded(big), tile_size=choice.tile_size)[:, :16]
    assert (safetensors.torch.load_file(str(lat))["latent"] - want).abs().max().item() <= 1e-5

    result = runner.invoke(app, ["video", "encode", str(big), "-o", str(tmp_path / "no.safetensors"), *MODEL, "--max-memory", "2MiB"])
    assert result.exit_code == 1 and "Traceback" not in result.output and not (tmp_path / "no.safetensors").exists()
    assert "2.0 MiB is too small to encode 5 frames of 192x128: the smallest tile (64 px" in " ".join(result.stderr.split())

    args = ["video", "roundtrip", str(frames), "-o", str(tmp_path / "rt"), *MODEL, "--tile", "exact", "--tile-size", "32", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["encode_tile_mode"] == summary["tile_mode"] == "fast" and summary["encode_tile"] == summary["tile"] == 32
    assert "--tile exact: a causal video VAE has no exact tiles; fast tiles are used" in " ".join(result.stderr.split())
