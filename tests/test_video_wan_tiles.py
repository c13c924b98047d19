"""Tile-major Wan video decode (one tile's causal cache at a time) and the calibrated video planner that picks it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vaetool.api import load_vae
from vaetool.cli import app
from vaetool.errors import MemoryBudgetError
from vaetool.tiling import Tiling
from vaetool.tiling.causal import decode_video_fast, decode_video_tiles
from vaetool.tiling.causal_plan import VIDEO_SCALE, estimate_video, plan_video, video_need
from vaetool.video.causal import save_causal

MODEL = ["-m", "tiny-wan", "--device", "cpu"]
MIB = 2**20


@pytest.fixture(scope="module")
def wan() -> torch.nn.Module:
    """The WanVAE the CLI builds for -m tiny-wan (random weights, seeded the same way)."""
    return load_vae("tiny-wan").model


@pytest.mark.parametrize(
    ("shape", "tile", "overlap"), [((1, 16, 3, 16, 16), 64, None), ((1, 16, 4, 13, 11), 48, 32), ((2, 16, 2, 9, 12), 64, 0)]
)
def test_tile_major_is_frame_major(wan, shape: tuple[int, ...], tile: int, overlap: int | None) -> None:
    z = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        frames = list(decode_video_fast(wan, z, tile_size=tile, overlap=overlap))
        tiles = list(decode_video_tiles(wan, z, tile_size=tile, overlap=overlap))
    assert [c.shape for c in tiles] == [c.shape for c in frames] and [c.shape[2] for c in tiles] == [1] + [4] * (shape[2] - 1)
    got, want = torch.cat(tiles, dim=2), torch.cat(frames, dim=2)  # [B, 3, T, H, W]
    assert want.std() > 0.05 and (got - want).abs().max().item() <= 1e-5


def test_the_estimate_counts_what_each_order_holds(wan) -> None:
    short, long = (1, 16, 3, 32, 32), (1, 16, 9, 32, 32)
    for dtype in (torch.float32, torch.bfloat16):
        # untiled and frame-major stream: their need does not grow with the clip; tile-major holds the whole clip
        assert estimate_video(wan, long, dtype) == estimate_video(wan, short, dtype)
        assert estimate_video(wan, long, dtype, 64) == estimate_video(wan, short, dtype, 64)
        assert estimate_video(wan, long, dtype, 64, "tiles") > estimate_video(wan, short, dtype, 64, "tiles")
        clip = video_need(wan, long, dtype, 64, "tiles")["clip"]
        assert clip >= 1 * 3 * 33 * 256 * 256 * 4  # the float32 accumulator of all 33 frames
        # frame-major keeps every tile's cache, whatever the tile; tile-major one tile's, so it shrinks with the tile
        caches = [video_need(wan, short, dtype, t, "frames")["caches"] for t in (64, 128)]
        assert min(caches) >= video_need(wan, short, dtype)["caches"]
        assert video_need(wan, short, dtype, 64, "tiles")["caches"] < video_need(wan, short, dtype, 128, "tiles")["caches"]
        # tile-major needs grow with the tile
        needs = [estimate_video(wan, short, dtype, t, "tiles") for t in (64, 128, 192)]
        assert needs == sorted(needs)
    # bf16 halves the peak once freed memory leaves the process (docs/memory.md): all but the float32 buffers halve
    assert 1.0 <= VIDEO_SCALE <= 1.15
    for tile, order, most in ((None, "frames", 0.6), (64, "frames", 0.6), (64, "tiles", 0.9)):  # tile-major: its float32 clip
        half, full = (video_need(wan, short, dtype, tile, order) for dtype in (torch.bfloat16, torch.float32))
        assert half["output"] == full["output"] and half.get("clip", 0) * 2 >= full.get("clip", 0)  # float32 frames whatever the weights
        assert all(2 * half[k] == full[k] for k in ("caches", "past"))
        ratio = estimate_video(wan, short, torch.bfloat16, tile, order) / estimate_video(wan, short, torch.float32, tile, order)
        assert 0.5 < ratio < most


def test_the_planner_goes_untiled_frame_major_tile_major_then_refuses(wan) -> None:
    shape = (1, 16, 3, 32, 32)  # 9 frames of 256 x 256

    def need(tile: int | None, order: str = "frames") -> int:
        return estimate_video(wan, shape, torch.float32, tile, order)

    tiles = (64, 128, 192, 256)
    frame_major, tile_major = min(need(t) for t in tiles), min(need(t, "tiles") for t in tiles)
    assert tile_major < frame_major < need(None)  # on this clip each step down fits a smaller budget
    assert plan_video(wan, shape, Tiling(max_memory=need(None))) == ("off", None, None, need(None))
    choice = plan_video(wan, shape, Tiling(max_memory=frame_major))
    assert choice.mode == "fast" and choice.order == "frames" and choice.need is not None and choice.need <= frame_major
    choice = plan_video(wan, shape, Tiling(max_memory=frame_major - 1))
    assert choice.mode == "fast" and choice.order == "tiles" and choice.need is not None and choice.need < frame_major
    assert choice.tile_size == max(t for t in tiles if need(t, "tiles") < frame_major)
    with pytest.raises(MemoryBudgetError, match="smallest tile .64 px"):
        plan_video(wan, shape, Tiling(max_memory=tile_major - 1))
    # a tile size given: frame-major when it fits, else tile-major
    assert plan_video(wan, shape, Tiling("fast", 64)).order == "frames"
    assert plan_video(wan, shape, Tiling("fast", 64, max_memory=need(64) - 1)).order == "tiles"
    assert plan_video(wan, shape, Tiling("off")) == ("off", None, None, None)


def _pngs(folder: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)).astype(int) for p in sorted(folder.iterdir())]


def test_the_cli_runs_tile_major_under_a_small_budget(runner, tmp_path: Path, wan) -> None:
    shape = (1, 16, 3, 32, 32)
    tile_major = min(estimate_video(wan, shape, torch.float32, t, "tiles") for t in (64, 128))
    budget = f"{-(-tile_major // MIB)}MiB"  # below any frame-major plan (the test above)
    choice = plan_video(wan, shape, Tiling(max_memory=budget))
    assert choice.order == "tiles"
    lat = tmp_path / "clip.safetensors"
    z = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    save_causal(lat, z, {"kind": "video", "layout": "BCTHW", "frames": 7, "time_downscale": 4})
    result = runner.invoke(app, ["video", "decode", str(lat), "-o", str(tmp_path / "tiles"), *MODEL, "--max-memory", budget, "--json"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["tile_mode"], summary["tile"], summary["tile_order"]) == ("fast", choice.tile_size, "tiles")
    args = ["video", "decode", str(lat), "-o", str(tmp_path / "frames"), *MODEL, "--tile", "fast", "--tile-size", str(choice.tile_size)]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["tile_order"] == "frames"
    got, want = _pngs(tmp_path / "tiles"), _pngs(tmp_path / "frames")
    assert len(got) == 7 == len(want) and np.std(got[0]) > 5
    assert max(np.abs(a - b).max() for a, b in zip(got, want, strict=True)) <= 1  # uint8 rounding of floats 1e-6 apart
    result = runner.invoke(app, ["video", "decode", str(lat), "-o", str(tmp_path / "no"), *MODEL, "--max-memory", "4MiB"])
    assert result.exit_code != 0 and "too small to decode a 256x256 video" in " ".join(result.stderr.split())
