"""vaetool.video: chunk plans and blending, diffusers parity of chunked temporal decoding, frame I/O, latent files."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vaetool.api import Vae
from vaetool.config import instantiate_from_config
from vaetool.errors import InputError, OutputError, OutputExistsError
from vaetool.families import get_family
from vaetool.keymaps import to_original
from vaetool.tiling import Tiling
from vaetool.video.chunks import FrameSpan, blend_weights, chunk_spans, decode_chunks, iter_decode_chunks
from vaetool.video.coding import DecodePlan, frame_decoder
from vaetool.video.frames import natural_key, open_frames
from vaetool.video.store import load_video_latents, save_video_latents
from vaetool.video.writers import open_writer, output_kind

# ---- chunk plans and blending ------------------------------------------------------------------


def test_chunk_spans_examples() -> None:
    assert chunk_spans(10, 4) == [FrameSpan(0, 4), FrameSpan(4, 8), FrameSpan(8, 10)]  # upstream: disjoint, ragged last
    assert chunk_spans(10, 4, 2) == [FrameSpan(0, 4), FrameSpan(2, 6), FrameSpan(4, 8), FrameSpan(6, 10)]
    assert chunk_spans(7, 4, 2) == [FrameSpan(0, 4), FrameSpan(2, 6), FrameSpan(4, 7)]
    assert chunk_spans(3, 14, 3) == [FrameSpan(0, 3)]
    assert chunk_spans(0, 4) == []


@pytest.mark.parametrize("frames", [1, 2, 5, 13, 14, 15, 29])
@pytest.mark.parametrize(("chunk", "overlap"), [(1, 0), (3, 0), (3, 1), (4, 2), (14, 3), (14, 7)])
def test_chunk_spans_cover_every_frame(frames: int, chunk: int, overlap: int) -> None:
    spans = chunk_spans(frames, chunk, overlap)
    assert spans[0].start == 0 and spans[-1].stop == frames
    assert all(1 <= len(s) <= chunk for s in spans)
    assert all(len(s) == chunk for s in spans[:-1])
    for a, b in itertools.pairwise(spans):
        assert a.stop - b.start == overlap  # consecutive chunks share exactly `overlap` frames
        assert b.stop > a.stop


@pytest.mark.parametrize(("chunk", "overlap"), [(0, 0), (4, 3), (4, -1)])
def test_bad_chunking_is_a_value_error(chunk: int, overlap: int) -> None:
    with pytest.raises(ValueError):
        chunk_spans(10, chunk, overlap)


def test_blend_weights_cross_fade() -> None:
    w = blend_weights(6, 2, 3)
    assert torch.allclose(w, torch.tensor([1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25]))
    assert torch.allclose(blend_weights(3, 3, 0)[:3] + blend_weights(4, 0, 3)[1:], torch.ones(3))  # partition of unity


def _per_chunk_constant(log: list[tuple[int, int]]):
    def decode(z: torch.Tensor, n: int) -> torch.Tensor:
        log.append((n, z.shape[0]))
        return torch.full((n, 3, 2, 2), float(len(log) - 1))  # chunk k decodes to the constant k

    return decode


def test_overlap_is_a_linear_cross_fade() -> None:
    log: list[tuple[int, int]] = []
    out = decode_chunks(_per_chunk_constant(log), torch.zeros(6, 4, 1, 1), chunk_frames=4, overlap=2)
    assert log == [(4, 4), (4, 4)]
    assert torch.allclose(out[:, 0, 0, 0], torch.tensor([0, 0, 1 / 3, 2 / 3, 1, 1]))


def test_frames_come_out_once_in_order() -> None:
    z = torch.randn(11, 4, 2, 3)
    starts, got = [], []
    for start, frames in iter_decode_chunks(lambda c, n: c[:, :3].repeat_interleave(2, -1).repeat_interleave(2, -2),
                                            z, chunk_frames=4, overlap=2):
        starts.append(start)
        got.append(frames)
    sizes = [g.shape[0] for g in got]
    assert starts == [0, 2, 4, 6, 8] and sizes == [2, 2, 2, 2, 3]
    # a decoder without temporal context gives the same frames however they are chunked and blended
    assert torch.allclose(torch.cat(got), z[:, :3].repeat_interleave(2, -1).repeat_interleave(2, -2), atol=1e-6)


# ---- parity with diffusers' chunked decode (StableVideoDiffusionPipeline.decode_latents) -------

TINY = {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 2, "attn_resolutions": [], "in_channels": 3,
        "out_ch": 3, "resolution": 32, "z_channels": 4, "double_z": True}


@pytest.fixture(scope="module")
def svd_pair() -> tuple[torch.nn.Module, Vae]:
    """A tiny diffusers AutoencoderKLTemporalDecoder with live temporal layers, and vaetool's twin as a Vae."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKLTemporalDecoder(
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2, layers_per_block=2, latent_channels=4
    ).eval()
    with torch.no_grad():  # wake the zero-initialised temporal parts so chunk context matters
        for name, p in ref.named_parameters():
            if name.endswith("mix_factor"):
                p.copy_(torch.randn_like(p) * 1.5)
            elif "temporal_res_block" in name or "time_conv_out" in name:
                p.add_(torch.randn_like(p) * 0.1)
    cfg = {"target": "vaetool.AutoencodingEngine", "params": {
        "encoder_config": {"target": "vaetool.Encoder", "params": TINY},
        "decoder_config": {"target": "vaetool.VideoDecoder", "params": {**TINY, "video_kernel_size": [3, 1, 1]}},
        "use_quant_conv": True, "use_post_quant_conv": False, "embed_dim": 4}}
    ours = instantiate_from_config(cfg).eval().requires_grad_(False)
    ours.load_state_dict(to_original(ref.state_dict()), strict=True)
    return ref, Vae(ours, get_family("svd"))


def _diffusers_chunked(ref: torch.nn.Module, z: torch.Tensor, decode_chunk_size: int) -> torch.Tensor:
    """The loop of diffusers' StableVideoDiffusionPipeline.decode_latents (its module needs transformers)."""
    frames = []
    for i in range(0, z.shape[0], decode_chunk_size):
        chunk = z[i : i + decode_chunk_size]
        frames.append(ref.decode(chunk, num_frames=chunk.shape[0]).sample)
    return torch.cat(frames)


@pytest.mark.parametrize(("frames", "chunk"), [(9, 3), (8, 3), (7, 4)])  # 3 even chunks, ragged last chunks
def test_chunked_decode_matches_diffusers(svd_pair, frames: int, chunk: int) -> None:
    ref, vae = svd_pair
    z = torch.randn(frames, 4, 5, 6)
    plan = DecodePlan(temporal=True, chunk_frames=chunk, overlap=0, tiling=Tiling("off"))
    with torch.no_grad():
        expected = _diffusers_chunked(ref, z, chunk)
        got = decode_chunks(frame_decoder(vae, plan), z, chunk, 0)
        whole = vae.decode(z, timesteps=frames, clamp=False)
    assert got.shape == expected.shape == (frames, 3, 10, 12)
    assert (got - expected).abs().max().item() <= 1e-4
    assert (got - whole).abs().max().item() > 1e-3  # the chunk context really matters here


def test_tiled_chunks_match_untiled(svd_pair) -> None:
    pytest.importorskip("vaetool.tiling")
    _, vae = svd_pair
    z = torch.randn(7, 4, 8, 8)
    untiled = decode_chunks(frame_decoder(vae, DecodePlan(True, 4, 1, Tiling("off"))), z, 4, 1)
    tiled = decode_chunks(frame_decoder(vae, DecodePlan(True, 4, 1, Tiling("exact", 16))), z, 4, 1)
    assert (tiled - untiled).abs().max().item() <= 1e-4


@pytest.mark.parametrize("merge", ["fixed", "learned"])
@pytest.mark.parametrize("mode", ["all", "conv-only", "attn-only", "only-last-conv"])
def test_every_time_mode_and_merge_strategy_from_a_config(mode: str, merge: str) -> None:
    from vaetool.api import load_vae
    from vaetool.video.coding import is_temporal, plan_decode

    params = "model.params.decoder_config.params"
    vae = load_vae("tiny-svd", overrides=[f"{params}.time_mode={mode}", f"{params}.merge_strategy={merge}",
                                          f"{params}.alpha=0.3"])
    assert vae.model.decoder.time_mode == mode and vae.model.decoder.merge_strategy == merge and is_temporal(vae)
    plan = plan_decode(vae, 5, 16, 16, chunk_frames=3, overlap=1, tiling=Tiling("off"))
    out = decode_chunks(frame_decoder(vae, plan), torch.randn(5, 4, 2, 2), plan.chunk_frames, plan.overlap)
    assert out.shape == (5, 3, 16, 16) and torch.isfinite(out).all()


def test_plan_defaults() -> None:
    from vaetool.api import load_vae
    from vaetool.errors import ConfigError
    from vaetool.video.coding import plan_decode

    svd, image_only = load_vae("tiny-svd"), load_vae("tiny-f8")
    off, exact = Tiling("off"), Tiling("exact", 32)
    assert plan_decode(svd, 20, 64, 64, tiling=off) == DecodePlan(True, 14, 3, off)
    assert plan_decode(svd, 5, 64, 64, tiling=off) == DecodePlan(True, 5, 2, off)  # never more than the video
    assert plan_decode(svd, 20, 64, 64, chunk_frames=4, tiling=off) == DecodePlan(True, 4, 2, off)
    assert plan_decode(svd, 20, 64, 64, chunk_frames=4, overlap=0, tiling=exact) == DecodePlan(True, 4, 0, exact)
    assert plan_decode(image_only, 20, 64, 64, overlap=2, batch_size=3, tiling=off) == DecodePlan(False, 3, 0, off)
    with pytest.raises(ConfigError, match="--overlap 3"):
        plan_decode(svd, 20, 64, 64, chunk_frames=4, overlap=3, tiling=off)


def test_low_memory_tiles_chunks_rather_than_cutting_them(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    import vaetool.memory
    from vaetool.api import load_vae
    from vaetool.errors import MemoryBudgetError
    from vaetool.video.coding import plan_decode

    vae = load_vae("tiny-svd")
    weights = sum(t.numel() * t.element_size() for t in vae.model.parameters())
    mb = 1 << 20

    def fake_plan(model, op, height, width, batch, dtype, max_memory, device, *, mode, min_batch=1):  # 1 MiB/frame, 10 kB/tile px
        budget = int(max_memory)
        fit = min(batch, (budget - weights) // mb)
        if fit >= 1:
            return SimpleNamespace(fits_untiled=True, tile=None, batch_size=fit, budget=budget)
        tile = (budget - weights) // 10_000 // 16 * 16
        if tile < 16:
            raise MemoryBudgetError("too small")
        return SimpleNamespace(fits_untiled=False, tile=tile, batch_size=1, budget=budget)

    monkeypatch.setattr(vaetool.memory, "plan", fake_plan)

    def budget(extra: int) -> Tiling:
        return Tiling(max_memory=weights + extra)

    assert plan_decode(vae, 20, 64, 64, tiling=budget(20 * mb)) == DecodePlan(True, 14, 3, budget(20 * mb))
    # 3 frames would fit untiled; 8 frames get tiles sized for an eighth of the activation budget each
    assert plan_decode(vae, 20, 64, 64, tiling=budget(7 * mb // 2)) == DecodePlan(True, 8, 3, Tiling("exact", 32, weights + 7 * mb // 2))
    assert plan_decode(vae, 20, 64, 64, tiling=budget(mb)) == DecodePlan(True, 1, 0, budget(mb))  # no tile fits
    assert plan_decode(vae, 20, 64, 64, chunk_frames=6, tiling=budget(3 * mb)).chunk_frames == 6  # as asked


# ---- reading frames ----------------------------------------------------------------------------


def _frame(i: int, h: int = 24, w: int = 32) -> np.ndarray:
    """A distinct uint8 frame [h, w, 3]: a bar that moves with i."""
    a = np.full((h, w, 3), 40, np.uint8)
    a[:, (3 * i) % w : (3 * i) % w + 3] = (250, 120, 10)
    a[0, 0] = (i * 20) % 256, 0, 0
    return a


def test_natural_key_orders_numbers_by_value() -> None:
    names = ["frame10.png", "frame2.png", "Frame1.png", "frame2b.png", "a.png"]
    assert sorted(names, key=natural_key) == ["a.png", "Frame1.png", "frame2.png", "frame2b.png", "frame10.png"]


def test_folder_in_natural_order(tmp_path: Path) -> None:
    for i in (10, 2, 1, 3):
        Image.fromarray(_frame(i)).save(tmp_path / f"frame{i}.png")
    (tmp_path / "notes.txt").write_text("not a frame")
    info, frames = open_frames(tmp_path)
    got = list(frames)
    assert info.kind == "folder" and info.frames == 4
    assert [f.label for f in got] == ["frame1.png", "frame2.png", "frame3.png", "frame10.png"]
    assert torch.equal(((got[3].image + 1) * 127.5).round().byte().permute(1, 2, 0), torch.from_numpy(_frame(10)))


def test_animated_gif_frames_and_rate(tmp_path: Path) -> None:
    path = tmp_path / "clip.gif"
    images = [Image.fromarray(_frame(i)) for i in range(5)]
    images[0].save(path, save_all=True, append_images=images[1:], duration=100, loop=0)
    info, frames = open_frames(path)
    got = list(frames)
    assert info.kind == "animated" and info.frames == 5 and info.fps == pytest.approx(10.0)
    assert [tuple(f.image.shape) for f in got] == [(3, 24, 32)] * 5
    assert [f.label for f in got] == [f"frame {i}" for i in range(5)]
    assert open_frames(path, fps=24)[0].fps == 24.0


def test_mismatched_size_names_the_frame_or_resizes(tmp_path: Path) -> None:
    for i in range(3):
        Image.fromarray(_frame(i, w=32 if i != 2 else 30)).save(tmp_path / f"f{i}.png")
    with pytest.raises(InputError, match=r"f2\.png: frame size 30x24 differs from the first frame's 32x24 \(f0\.png\); use --resize"):
        list(open_frames(tmp_path)[1])
    resized = list(open_frames(tmp_path, resize=True)[1])
    assert [tuple(f.image.shape) for f in resized] == [(3, 24, 32)] * 3
    assert resized[2].image.min() >= -1 and resized[2].image.max() <= 1


def test_corrupt_frame_is_named(tmp_path: Path) -> None:
    for i in range(4):
        Image.fromarray(_frame(i)).save(tmp_path / f"f{i}.png")
    (tmp_path / "f2.png").write_bytes((tmp_path / "f2.png").read_bytes()[:60])
    frames = open_frames(tmp_path)[1]
    assert next(frames).label == "f0.png"
    with pytest.raises(InputError, match=r"f2\.png"):
        list(frames)


def test_empty_and_unsupported_inputs(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no frames in this folder"):
        open_frames(tmp_path)
    (tmp_path / "x.gif").write_bytes(b"")
    with pytest.raises(InputError, match="empty file"):
        open_frames(tmp_path / "x.gif")
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(InputError, match="unsupported video input '.txt'"):
        open_frames(tmp_path / "x.txt")


def test_video_without_the_extra_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "av", None)  # import av -> ImportError
    (tmp_path / "clip.mp4").write_bytes(b"\x00" * 64)
    with pytest.raises(InputError, match=r"pip install 'vaetool\[video\]'"):
        open_frames(tmp_path / "clip.mp4")
    with pytest.raises(OutputError, match=r"pip install 'vaetool\[video\]'"):
        open_writer(tmp_path / "out.mp4", fps=8, frames=3)


# ---- writers and latent files ------------------------------------------------------------------


def test_png_folder_is_published_only_on_commit(tmp_path: Path) -> None:
    out = tmp_path / "frames"
    writer = open_writer(out, fps=8, frames=3)
    writer.add(_frame(0))
    writer.abort()
    assert list(tmp_path.iterdir()) == []
    writer = open_writer(out, fps=8, frames=3)
    for i in range(3):
        writer.add(_frame(i))
    assert not out.exists()
    writer.commit()
    assert sorted(p.name for p in out.iterdir()) == ["frame_00000.png", "frame_00001.png", "frame_00002.png"]
    assert np.array_equal(np.asarray(Image.open(out / "frame_00002.png")), _frame(2))
    with pytest.raises(OutputExistsError):
        open_writer(out, fps=8, frames=3)
    replacement = open_writer(out, fps=8, frames=1, overwrite=True)
    replacement.add(_frame(7))
    replacement.commit()
    assert [p.name for p in out.iterdir()] == ["frame_00000.png"] and len(list(tmp_path.iterdir())) == 1


def test_gif_writer_and_output_kinds(tmp_path: Path) -> None:
    writer = open_writer(tmp_path / "a.gif", fps=10, frames=4)
    for i in range(4):
        writer.add(_frame(i))
    writer.commit()
    with Image.open(tmp_path / "a.gif") as im:
        assert im.n_frames == 4 and im.size == (32, 24) and im.info["duration"] == 100
    assert [output_kind(Path(p)) for p in ("out", "a.gif", "a.webp", "a.MP4")] == ["frames", "animation", "animation", "video"]
    with pytest.raises(OutputError, match="a folder"):
        output_kind(Path("a.png"))


def test_mp4_roundtrip(tmp_path: Path) -> None:
    pytest.importorskip("av", reason="the video extra (PyAV) is not installed: pip install 'vaetool[video]'")
    writer = open_writer(tmp_path / "a.mp4", fps=12, frames=6)
    for i in range(6):
        writer.add(_frame(i))
    writer.commit()
    assert [p.name for p in tmp_path.iterdir()] == ["a.mp4"]
    info, frames = open_frames(tmp_path / "a.mp4")
    got = [f.image for f in frames]
    assert info.fps == pytest.approx(12.0) and len(got) == 6
    assert all(tuple(g.shape) == (3, 24, 32) for g in got)
    expected = torch.stack([torch.from_numpy(_frame(i)).permute(2, 0, 1).float() / 127.5 - 1 for i in range(6)])
    assert (torch.stack(got) - expected).abs().mean().item() < 0.05  # lossy, but the same frames in the same order


def test_video_latents_roundtrip(tmp_path: Path) -> None:
    z = torch.randn(5, 4, 3, 4)
    meta = {"kind": "video", "fps": 7.5, "frames": 5, "original_size": [20, 30], "family": "svd", "config": None}
    save_video_latents(tmp_path / "v.safetensors", z, meta)
    got, got_meta = load_video_latents(tmp_path / "v.safetensors")
    assert torch.equal(got, z)
    assert got_meta["fps"] == 7.5 and got_meta["frames"] == 5 and got_meta["original_size"] == [20, 30]
    assert "config" not in got_meta
    save_video_latents(tmp_path / "bad.safetensors", z, {**meta, "frames": 6})
    with pytest.raises(InputError, match="6 frames"):
        load_video_latents(tmp_path / "bad.safetensors")
