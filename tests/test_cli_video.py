"""`vaetool video`: frames/GIF/mp4 through the tiny temporal VAE, and every bad input failing cleanly."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vaetool.api import load_vae
from vaetool.cli import app
from vaetool.tiling import Tiling
from vaetool.video.coding import decode_video, plan_decode
from vaetool.video.store import load_video_latents

MODEL = ["-m", "tiny-svd", "--device", "cpu"]
ORDER = [1, 2, 3, 5, 10, 11, 20]  # natural order differs from the lexical one (10 < 2)


def _frame(i: int, h: int = 24, w: int = 32) -> np.ndarray:
    """A distinct uint8 frame [h, w, 3]: a bright bar that moves with i over a gradient."""
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 1] = np.linspace(0, 200, w, dtype=np.uint8)[None, :]
    a[:, (3 * i) % (w - 3) : (3 * i) % (w - 3) + 3] = (250, 120, 10)
    return a


def _folder(path: Path, numbers: list[int] = ORDER, sizes: dict[int, tuple[int, int]] | None = None) -> Path:
    path.mkdir()
    for i in numbers:
        h, w = (sizes or {}).get(i, (24, 32))
        Image.fromarray(_frame(i, h, w)).save(path / f"frame{i}.png")
    return path


def _gif(path: Path, n: int = 6, ms: int = 80) -> Path:
    images = [Image.fromarray(_frame(i)) for i in range(n)]
    images[0].save(path, save_all=True, append_images=images[1:], duration=ms, loop=0)
    return path


def _invoke(runner, *args: object):
    return runner.invoke(app, ["video", *map(str, args)])


def _leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name.startswith("."))


def test_frames_to_latents_to_frames(runner, tmp_path: Path) -> None:
    frames = _folder(tmp_path / "in")
    lat = tmp_path / "clip.safetensors"
    result = _invoke(runner, "encode", frames, "-o", lat, *MODEL, "--fps", 12)
    assert result.exit_code == 0, result.stderr
    latents, meta = load_video_latents(lat)
    assert latents.shape == (len(ORDER), 4, 3, 4)
    assert meta["kind"] == "video" and meta["frames"] == len(ORDER) and meta["fps"] == 12.0
    assert meta["original_size"] == [24, 32] and meta["family"] == "svd" and meta["latent_format"] == "raw"
    vae = load_vae("tiny-svd")
    images = torch.stack([torch.from_numpy(_frame(i)).permute(2, 0, 1).float() / 127.5 - 1 for i in ORDER])
    assert (latents - vae.encode(images)).abs().max().item() <= 1e-4  # frame t is the t-th in natural order

    out = tmp_path / "out"
    result = _invoke(runner, "decode", lat, "-o", out, *MODEL, "--chunk-frames", 4, "--overlap", 2, "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["frames"] == len(ORDER) and summary["chunk_frames"] == 4 and summary["overlap"] == 2 and summary["temporal"]
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"frame_{i:05d}.png" for i in range(len(ORDER))]
    plan = plan_decode(vae, len(ORDER), 24, 32, chunk_frames=4, overlap=2, tiling=Tiling("off"))
    expected = list(decode_video(vae, latents, plan, size=(24, 32)))
    for name, want in zip(names, expected, strict=False):
        assert np.array_equal(np.asarray(Image.open(out / name)), want)
    assert _leftovers(tmp_path) == []


def test_gif_in_gif_and_pngs_out(runner, tmp_path: Path) -> None:
    gif = _gif(tmp_path / "in.gif")
    result = _invoke(runner, "roundtrip", gif, "-o", tmp_path / "out.gif", "-o", tmp_path / "png", *MODEL,
                     "--chunk-frames", 4)
    assert result.exit_code == 0, result.stderr
    with Image.open(tmp_path / "out.gif") as im:
        assert im.n_frames == 6 and im.size == (32, 24) and im.info["duration"] == 80
    pngs = sorted((tmp_path / "png").iterdir())
    assert len(pngs) == 6 and all(Image.open(p).size == (32, 24) for p in pngs)
    assert "6 frames 32x24" in result.stderr


def test_odd_size_is_padded_and_cropped_back_tiled_or_not(runner, tmp_path: Path) -> None:
    frames = _folder(tmp_path / "in", [0, 1, 2], {i: (21, 30) for i in range(3)})
    result = _invoke(runner, "roundtrip", frames, "-o", tmp_path / "out", *MODEL)
    assert result.exit_code == 0, result.stderr
    assert [Image.open(p).size for p in sorted((tmp_path / "out").iterdir())] == [(30, 21)] * 3
    result = _invoke(runner, "roundtrip", frames, "-o", tmp_path / "tiled", *MODEL, "--tile", "exact", "--tile-size", 16)
    assert result.exit_code == 0, result.stderr
    for a, b in zip(sorted((tmp_path / "out").iterdir()), sorted((tmp_path / "tiled").iterdir()), strict=False):
        diff = np.abs(np.asarray(Image.open(a), np.int16) - np.asarray(Image.open(b), np.int16))
        assert diff.max() <= 1  # exact tiling: equal up to float rounding


def test_mp4_in_mp4_out(runner, tmp_path: Path) -> None:
    av = pytest.importorskip("av", reason="the video extra (PyAV) is not installed: pip install 'vaetool[video]'")
    src = tmp_path / "in.mp4"
    with av.open(str(src), mode="w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
        for i in range(5):
            for packet in stream.encode(av.VideoFrame.from_ndarray(_frame(i), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    result = _invoke(runner, "roundtrip", src, "-o", tmp_path / "out.mp4", *MODEL, "--chunk-frames", 4)
    assert result.exit_code == 0, result.stderr
    with av.open(str(tmp_path / "out.mp4")) as container:
        stream = container.streams.video[0]
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert float(stream.average_rate) == pytest.approx(10.0)
    assert len(decoded) == 5 and all(d.shape == (24, 32, 3) for d in decoded)


def test_image_only_vae_goes_frame_by_frame_and_says_so(runner, tmp_path: Path) -> None:
    frames = _folder(tmp_path / "in", [0, 1, 2, 3, 4])
    result = _invoke(runner, "roundtrip", frames, "-o", tmp_path / "out", "-m", "tiny-f8", "--device", "cpu", "--json")
    assert result.exit_code == 0, result.stderr
    assert "no temporal layers" in result.stderr and "frame by frame" in result.stderr
    assert json.loads(result.stdout)["temporal"] is False
    assert len(list((tmp_path / "out").iterdir())) == 5


# ---- bad input ----------------------------------------------------------------------------------


def _fails(result, *needles: str, code: int = 1) -> str:
    assert result.exit_code == code, result.stdout
    err = " ".join(result.stderr.split())  # one logical line, whatever the console width
    assert "Traceback" not in err and all(n in err for n in needles), err
    return err


def test_empty_folder(runner, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    _fails(_invoke(runner, "encode", tmp_path / "empty", "-o", tmp_path / "x.safetensors", *MODEL),
           "empty: no frames in this folder")
    assert not (tmp_path / "x.safetensors").exists()


def test_frames_of_different_sizes(runner, tmp_path: Path) -> None:
    frames = _folder(tmp_path / "in", [1, 2, 3, 4], {3: (24, 40), 4: (16, 16)})
    _fails(_invoke(runner, "encode", frames, "-o", tmp_path / "x.safetensors", *MODEL),
           "frame3.png: frame size 40x24 differs from the first frame's 32x24 (frame1.png)", "--resize")
    result = _invoke(runner, "encode", frames, "-o", tmp_path / "x.safetensors", *MODEL, "--resize")
    assert result.exit_code == 0, result.stderr
    assert load_video_latents(tmp_path / "x.safetensors")[0].shape == (4, 4, 3, 4)


def test_corrupt_frame_in_the_middle_leaves_no_output(runner, tmp_path: Path) -> None:
    frames = _folder(tmp_path / "in", [1, 2, 3, 4, 5, 6])
    bad = frames / "frame4.png"
    bad.write_bytes(bad.read_bytes()[:80])
    out = tmp_path / "out"
    _fails(_invoke(runner, "roundtrip", frames, "-o", out, "-o", tmp_path / "out.gif", *MODEL, "--batch-size", 2),
           "frame4.png", "truncated")
    _fails(_invoke(runner, "encode", frames, "-o", tmp_path / "x.safetensors", *MODEL, "--batch-size", 2), "frame4.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]
    assert _leftovers(tmp_path) == []


def test_video_file_without_the_extra(runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "av", None)  # as if PyAV were not installed
    (tmp_path / "clip.mp4").write_bytes(b"\x00" * 128)
    _fails(_invoke(runner, "encode", tmp_path / "clip.mp4", "-o", tmp_path / "x.safetensors", *MODEL),
           "clip.mp4", "pip install 'vaetool[video]'")
    _fails(_invoke(runner, "roundtrip", _gif(tmp_path / "in.gif"), "-o", tmp_path / "out.mp4", *MODEL),
           "out.mp4", "pip install 'vaetool[video]'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4", "in.gif"]


def test_existing_output_and_bad_outputs(runner, tmp_path: Path) -> None:
    gif = _gif(tmp_path / "in.gif", n=3)
    (tmp_path / "out").mkdir()
    _fails(_invoke(runner, "roundtrip", gif, "-o", tmp_path / "out", *MODEL), "out: already exists", "--overwrite")
    result = _invoke(runner, "roundtrip", gif, "-o", tmp_path / "out", *MODEL, "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert len(list((tmp_path / "out").iterdir())) == 3
    # outputs of the wrong kind are usage errors (issue 12.5)
    _fails(_invoke(runner, "encode", gif, "-o", tmp_path / "x.gif", *MODEL), "writes one .safetensors file", code=2)
    _fails(_invoke(runner, "roundtrip", gif, "-o", tmp_path / "y.png", *MODEL), "y.png", "a folder (PNG frames)", code=2)
    _fails(_invoke(runner, "decode", gif, "-o", tmp_path / "w", *MODEL), "in.gif", "video decode reads latents", code=2)
    _fails(_invoke(runner, "roundtrip", gif, "-o", tmp_path / "z", *MODEL, "--chunk-frames", 4, "--overlap", 3),
           "--overlap 3", "half of chunk_frames", code=2)  # a usage error
    assert not (tmp_path / "z").exists()


def test_decode_rejects_latents_of_another_model(runner, tmp_path: Path) -> None:
    lat = tmp_path / "c.safetensors"
    assert _invoke(runner, "encode", _gif(tmp_path / "in.gif", n=3), "-o", lat, *MODEL).exit_code == 0
    _fails(_invoke(runner, "decode", lat, "-o", tmp_path / "out", "-m", "tiny-f8-16ch", "--device", "cpu"),
           "c.safetensors", "4 channels", "takes 16")


def _nan_when(monkeypatch: pytest.MonkeyPatch, bad: tuple[torch.dtype, ...]) -> None:
    """Vae.moments and Vae.decode return NaN for models of the `bad` dtypes (an overflowing half-precision model)."""
    from vaetool.api import Vae

    real_moments, real_decode = Vae.moments, Vae.decode

    def moments(self, images, **kw):
        mean, logvar = real_moments(self, images, **kw)
        return (mean * float("nan"), logvar) if self.dtype in bad else (mean, logvar)

    def decode(self, latents, **kw):
        out = real_decode(self, latents, **kw)
        return out * float("nan") if self.dtype in bad else out

    monkeypatch.setattr(Vae, "moments", moments)
    monkeypatch.setattr(Vae, "decode", decode)


def test_nan_in_half_precision_is_redone_in_fp32(runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    frames = _folder(tmp_path / "in")
    reference = _invoke(runner, "roundtrip", frames, "-o", tmp_path / "fp32", *MODEL, "--dtype", "fp32", "--chunk-frames", 4)
    assert reference.exit_code == 0, reference.stderr
    _nan_when(monkeypatch, (torch.bfloat16,))
    result = _invoke(runner, "roundtrip", frames, "-o", tmp_path / "bf16", *MODEL, "--dtype", "bf16", "--chunk-frames", 4)
    assert result.exit_code == 0, result.stderr
    assert result.stderr.count("redoing it in fp32") == 1
    names = sorted(p.name for p in (tmp_path / "fp32").iterdir())
    assert names and names == sorted(p.name for p in (tmp_path / "bf16").iterdir())
    for name in names:  # bf16-rounded weights run in fp32: close to the fp32 model, and not NaN garbage
        got = np.asarray(Image.open(tmp_path / "bf16" / name)).astype(int)
        want = np.asarray(Image.open(tmp_path / "fp32" / name)).astype(int)
        assert np.abs(got - want).max() <= 8
    as_json = _invoke(runner, "roundtrip", frames, "-o", tmp_path / "j", *MODEL, "--dtype", "bf16", "--chunk-frames", 4, "--json")
    assert json.loads(as_json.stdout)["fp32_retries"] == 1 + 3  # one encode batch, three decoder chunks


def test_nan_in_fp32_too_is_an_error_naming_the_input(runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    frames = _folder(tmp_path / "in")
    _nan_when(monkeypatch, (torch.bfloat16, torch.float32))
    result = _invoke(runner, "roundtrip", frames, "-o", tmp_path / "out", *MODEL, "--dtype", "bf16")
    assert result.exit_code == 1
    assert str(frames) in result.stderr and "has NaN/inf values" in result.stderr
    assert [line for line in result.stderr.splitlines() if not line.startswith(("note: ", "warning: tiny-svd: random"))] == [
        f"error: {frames}: the model's output for frames 0-6 has NaN/inf values"]
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
