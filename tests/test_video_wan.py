"""`vaetool video` with a causal video VAE (tiny-wan): one whole-clip latent [1, C, T', h, w], checked against the
model's own encode_video_moments / decode_video; clips of other lengths padded and trimmed; the image decode's refusal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from PIL import Image

from vaetool.api import load_vae
from vaetool.cli import app
from vaetool.families import WAN_MEAN, WAN_STD
from vaetool.io.images import to_uint8
from vaetool.io.latent_item import decode_metadata
from vaetool.video.causal import save_causal

MODEL = ["-m", "tiny-wan", "--device", "cpu"]


@pytest.fixture(scope="module")
def wan() -> torch.nn.Module:
    """The WanVAE the CLI builds for -m tiny-wan (random weights, seeded the same way)."""
    return load_vae("tiny-wan").model


def _frame(i: int, h: int, w: int) -> np.ndarray:
    """A distinct uint8 frame [h, w, 3]: a bar that moves with i over a gradient."""
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 1] = np.linspace(0, 200, w, dtype=np.uint8)[None, :]
    a[:, (3 * i) % (w - 3) : (3 * i) % (w - 3) + 3] = (250, 120, 10)
    return a


def _folder(path: Path, n: int, h: int = 24, w: int = 40) -> tuple[Path, torch.Tensor]:
    """A folder of n frames and the same frames as a video [1, 3, n, h, w] in [-1, 1]."""
    path.mkdir()
    frames = [_frame(i, h, w) for i in range(n)]
    for i, a in enumerate(frames):
        Image.fromarray(a).save(path / f"f{i}.png")
    video = torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() / 127.5 - 1 for a in frames], dim=1)  # [3, n, h, w]
    return path, video[None]


def _invoke(runner, *args: object):
    return runner.invoke(app, ["video", *map(str, args)])


def _read(path: Path) -> tuple[torch.Tensor, dict]:
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta = decode_metadata(f.metadata())
    return safetensors.torch.load_file(str(path))["latent"], meta


def _pngs(folder: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in sorted(folder.iterdir())]


def _frames(video: torch.Tensor) -> list[np.ndarray]:
    """uint8 frames of a decoded video [1, 3, T, H, W]."""
    return [to_uint8(video[0, :, t]) for t in range(video.shape[2])]


@pytest.mark.parametrize("n", [5, 9])
def test_a_clip_is_one_latent_that_decodes_as_the_model_does(runner, tmp_path: Path, wan, n: int) -> None:
    frames, video = _folder(tmp_path / "in", n)
    lat = tmp_path / "clip.safetensors"
    result = _invoke(runner, "encode", frames, "-o", lat, *MODEL, "--fps", 12)
    assert result.exit_code == 0, result.stderr
    latent, meta = _read(lat)
    t = 1 + (n - 1) // 4
    assert latent.shape == (1, 16, t, 3, 5)
    assert meta["layout"] == "BCTHW" and meta["frames"] == n and meta["latent_frames"] == t and meta["time_downscale"] == 4
    assert meta["kind"] == "video" and meta["family"] == "wan" and meta["latent_format"] == "raw" and meta["fps"] == 12.0
    assert meta["original_size"] == [24, 40] and meta["mean"] == list(WAN_MEAN) and meta["std"] == list(WAN_STD)
    with torch.inference_mode():
        want = wan.encode_video_moments(video)[:, :16]  # [1, 16, t, 3, 5]: the posterior mean
        decoded = wan.decode_video(latent)  # [1, 3, n, 24, 40]
    assert (latent - want).abs().max().item() <= 1e-5

    out = tmp_path / "out"
    result = _invoke(runner, "decode", lat, "-o", out, *MODEL, "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["frames"] == n and summary["latent_shape"] == [1, 16, t, 3, 5] and summary["fps"] == 12.0
    got, expected = _pngs(out), _frames(decoded)
    assert len(got) == n == len(expected) and np.std(got[0]) > 5
    assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))


def test_a_count_that_is_not_1_plus_4k_is_padded_and_trimmed_back(runner, tmp_path: Path, wan) -> None:
    frames, video = _folder(tmp_path / "in", 6, 20, 30)  # 6 frames, a size that is not a multiple of 8
    lat = tmp_path / "clip.safetensors"
    result = _invoke(runner, "encode", frames, "-o", lat, *MODEL)
    assert result.exit_code == 0, result.stderr
    assert "6 frames is not 1 + 4k: padded to 9 by repeating the last frame" in " ".join(result.stderr.split())
    latent, meta = _read(lat)
    assert latent.shape == (1, 16, 3, 3, 4) and meta["frames"] == 6 and meta["original_size"] == [20, 30]
    padded = torch.cat([video, video[:, :, -1:].expand(-1, -1, 3, -1, -1)], dim=2)  # [1, 3, 9, 20, 30]
    padded = torch.nn.functional.pad(padded, (0, 2, 0, 4, 0, 0), mode="replicate")  # to 24x32, as the encoder sees it
    with torch.inference_mode():
        assert (latent - wan.encode_video_moments(padded)[:, :16]).abs().max().item() <= 1e-5
        decoded = wan.decode_video(latent)[:, :, :6, :20, :30]
    result = _invoke(runner, "decode", lat, "-o", tmp_path / "out", "-o", tmp_path / "out.gif", *MODEL)
    assert result.exit_code == 0, result.stderr
    got = _pngs(tmp_path / "out")
    assert len(got) == 6 and all(np.array_equal(a, b) for a, b in zip(got, _frames(decoded), strict=True))
    with Image.open(tmp_path / "out.gif") as im:
        assert im.n_frames == 6 and im.size == (30, 20)


def test_scaled_latents_and_roundtrip(runner, tmp_path: Path) -> None:
    frames, _ = _folder(tmp_path / "in", 5)
    result = _invoke(runner, "encode", frames, "-o", tmp_path / "raw.safetensors", *MODEL)
    assert result.exit_code == 0, result.stderr
    result = _invoke(runner, "encode", frames, "-o", tmp_path / "scaled.safetensors", *MODEL, "--scaled")
    assert result.exit_code == 0, result.stderr
    (raw, _), (scaled, meta) = _read(tmp_path / "raw.safetensors"), _read(tmp_path / "scaled.safetensors")
    mean, std = torch.tensor(WAN_MEAN).view(1, 16, 1, 1, 1), torch.tensor(WAN_STD).view(1, 16, 1, 1, 1)
    assert meta["latent_format"] == "scaled" and torch.allclose(scaled, (raw - mean) / std, atol=1e-5)
    for name in ("raw", "scaled"):
        result = _invoke(runner, "decode", tmp_path / f"{name}.safetensors", "-o", tmp_path / name, *MODEL)
        assert result.exit_code == 0, result.stderr
    for a, b in zip(_pngs(tmp_path / "raw"), _pngs(tmp_path / "scaled"), strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # the same clip, up to float rounding
    result = _invoke(runner, "roundtrip", frames, "-o", tmp_path / "rt", *MODEL, "--chunk-frames", 4)
    assert result.exit_code == 0, result.stderr
    assert "--chunk-frames: not used by a causal video VAE" in " ".join(result.stderr.split())
    assert all(np.array_equal(a, b) for a, b in zip(_pngs(tmp_path / "rt"), _pngs(tmp_path / "raw"), strict=True))


def test_a_comfyui_video_latent_decodes_to_all_its_frames(runner, tmp_path: Path, wan) -> None:
    latent = torch.randn(1, 16, 3, 3, 5, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "clip.latent"
    safetensors.torch.save_file({"latent_tensor": latent, "latent_format_version_0": torch.tensor([])}, str(path))
    result = _invoke(runner, "decode", path, "-o", tmp_path / "out", *MODEL)
    assert result.exit_code == 0, result.stderr
    with torch.inference_mode():
        expected = _frames(wan.decode_video(latent))
    got = _pngs(tmp_path / "out")
    assert len(got) == 9 and all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))


def test_refusals(runner, tmp_path: Path) -> None:
    frames, _ = _folder(tmp_path / "in", 5)
    lat = tmp_path / "clip.safetensors"
    assert _invoke(runner, "encode", frames, "-o", lat, *MODEL).exit_code == 0
    result = runner.invoke(app, ["decode", str(lat), "-o", str(tmp_path / "img"), *MODEL])  # the image command
    assert result.exit_code == 1 and "Traceback" not in result.output
    err = " ".join(result.stderr.split())
    assert (
        f"{lat}: a video latent [1, 16, 2, 3, 5] (2 latent frames): `vaetool decode` takes image latents; "
        "decode it with `vaetool video decode`" in err
    )
    assert not list((tmp_path / "img").glob("*.png"))
    result = _invoke(runner, "decode", lat, "-o", tmp_path / "f8", "-m", "tiny-f8", "--device", "cpu")  # not a video VAE
    assert result.exit_code == 1 and "needs a causal video VAE (wan, qwen-image), not sd1" in " ".join(result.stderr.split())
    bad = tmp_path / "bad.safetensors"  # metadata claims more frames than 2 latent frames give
    save_causal(bad, torch.zeros(1, 16, 2, 3, 5), {"kind": "video", "layout": "BCTHW", "frames": 9, "time_downscale": 4})
    result = _invoke(runner, "decode", bad, "-o", tmp_path / "bad", *MODEL)
    assert result.exit_code == 1
    assert "metadata frames 9 does not fit 2 latent frames, which decode to 5" in " ".join(result.stderr.split())
    assert not (tmp_path / "bad").exists() and not (tmp_path / "f8").exists()


def test_qwen_image_and_a_single_frame_go_the_same_way(runner, tmp_path: Path, wan) -> None:
    frames, video = _folder(tmp_path / "in", 1)
    lat = tmp_path / "one.safetensors"
    result = _invoke(runner, "encode", frames, "-o", lat, *MODEL, "--family", "qwen-image")
    assert result.exit_code == 0, result.stderr
    latent, meta = _read(lat)
    assert latent.shape == (1, 16, 1, 3, 5) and meta["family"] == "qwen-image" and meta["frames"] == 1
    with torch.inference_mode():
        assert (latent - wan.encode_video_moments(video)[:, :16]).abs().max().item() <= 1e-5


# ---------------------------------------------------------------- streamed and tiled decode


def _whole_clip(wan: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    """The decode before streaming: every latent frame through one cache, joined, then clamped."""
    from vaetool.nn.causal import FrameCache

    x, cache = wan.conv2(z), FrameCache()
    return torch.cat([wan.decoder(x[:, :, i : i + 1], cache) for i in range(z.shape[2])], dim=2).clamp_(-1.0, 1.0)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return 10 * torch.log10((a.max() - a.min()) ** 2 / (a - b).pow(2).mean()).item()


def test_the_streamed_decode_is_the_whole_clip_decode_bit_for_bit(wan) -> None:
    z = torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        chunks = list(wan.decode_video_frames(z))
        want = _whole_clip(wan, z)
        assert [c.shape[2] for c in chunks] == [1, 4, 4]
        assert torch.equal(torch.cat(chunks, dim=2), want) and torch.equal(wan.decode_video(z), want)


def test_fast_tiles_are_close_to_untiled_and_the_cli_runs_them(runner, tmp_path: Path, wan) -> None:
    from vaetool.tiling.causal import decode_video_fast

    z = torch.randn(1, 16, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        tiled = torch.cat(list(decode_video_fast(wan, z, tile_size=64)), dim=2)  # [1, 3, 9, 128, 128], 4 tiles
        untiled = wan.decode_video(z)
    assert tiled.shape == untiled.shape and 34.0 < _psnr(untiled, tiled) < 80  # measured 36.2 dB (docs/memory.md)
    lat = tmp_path / "clip.safetensors"
    save_causal(lat, z, {"kind": "video", "layout": "BCTHW", "frames": 9, "time_downscale": 4})
    result = _invoke(runner, "decode", lat, "-o", tmp_path / "out", *MODEL, "--tile", "fast", "--tile-size", 64, "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["tile_mode"] == "fast" and summary["tile"] == 64 and "not used" not in result.stderr
    got = _pngs(tmp_path / "out")
    assert len(got) == 9 and all(np.array_equal(a, b) for a, b in zip(got, _frames(tiled), strict=True))


def test_auto_tiles_under_a_small_budget(runner, tmp_path: Path, wan) -> None:
    from vaetool.tiling import Tiling
    from vaetool.tiling.causal_plan import estimate_video, plan_video

    shape = (1, 16, 3, 32, 32)  # 256 x 256 frames
    assert plan_video(wan, shape, Tiling()).mode == "off"  # the default budget: what is free
    untiled = estimate_video(wan, shape, torch.float32)  # weights, one 4-frame chunk, the causal caches
    assert plan_video(wan, shape, Tiling(max_memory=untiled + 2**20)).mode == "off"
    budget = -(-untiled // 2**20) - 2  # MiB: a frame-major tile fits (tests/test_video_wan_tiles.py)
    choice = plan_video(wan, shape, Tiling(max_memory=f"{budget}MiB"))
    assert choice.mode == "fast" and choice.tile_size is not None and choice.tile_size < 256
    lat = tmp_path / "clip.safetensors"
    save_causal(lat, torch.randn(shape), {"kind": "video", "layout": "BCTHW", "frames": 7, "time_downscale": 4})
    result = _invoke(runner, "decode", lat, "-o", tmp_path / "out", *MODEL, "--max-memory", f"{budget}MiB", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["tile_mode"] == "fast" and summary["tile"] == choice.tile_size and len(_pngs(tmp_path / "out")) == 7
    assert summary["tile_order"] == choice.order == "frames"
    result = _invoke(runner, "decode", lat, "-o", tmp_path / "whole", *MODEL, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["tile_mode"] == "off"
