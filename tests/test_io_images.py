"""vaetool.io.images and png16: every Pillow mode, EXIF orientation, 16-bit precision, bad files, PNG writing."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from vaetool.errors import InputError, OutputExistsError
from vaetool.io import png16
from vaetool.io.images import crop_to, load_image, pad_to_multiple, read_png_text, save_png, to_uint8

RNG = np.random.default_rng(0)


def _rgb(h: int = 12, w: int = 10) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _unit(a: np.ndarray, top: float = 255.0) -> torch.Tensor:
    """[H, W, C] integers -> the [3, H, W] tensor load_image should return."""
    return torch.from_numpy(a.astype(np.float32) / top).permute(2, 0, 1) * 2 - 1


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _filter_rows(samples: np.ndarray, first_kind: int = 0) -> bytes:
    """uint16 [H, W, C] -> filtered scanlines whose filter types cycle through all five (test-side encoder)."""
    h, w, c = samples.shape
    bpp = 2 * c
    rows = samples.astype(">u2").view(np.uint8).reshape(h, w * bpp).astype(np.int64)
    out = []
    for y in range(h):
        cur = rows[y]
        up = rows[y - 1] if y else np.zeros_like(cur)
        left = np.concatenate([np.zeros(bpp, np.int64), cur[:-bpp]])
        upleft = np.concatenate([np.zeros(bpp, np.int64), up[:-bpp]])
        p = left + up - upleft
        pa, pb, pc = abs(p - left), abs(p - up), abs(p - upleft)
        paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
        kind = (y + first_kind) % 5
        pred = [np.zeros_like(cur), left, up, (left + up) // 2, paeth][kind]
        out.append(bytes([kind]) + ((cur - pred) % 256).astype(np.uint8).tobytes())
    return b"".join(out)


ADAM7 = ((0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2), (0, 1, 2, 2), (1, 0, 2, 1))


def _filtered_png16(samples: np.ndarray, interlace: bool = False, extra: bytes = b"") -> bytes:
    """A 16-bit PNG of uint16 [H, W, C] (Adam7 passes when interlaced; `extra` chunks before IDAT)."""
    h, w, c = samples.shape
    passes = [samples[y0::dy, x0::dx] for y0, x0, dy, dx in ADAM7] if interlace else [samples]
    data = b"".join(_filter_rows(p, i) for i, p in enumerate(passes) if p.size)
    ihdr = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 2: 4, 3: 2, 4: 6}[c], 0, 0, int(interlace))
    return (png16.SIGNATURE + _png_chunk(b"IHDR", ihdr) + extra + _png_chunk(b"IDAT", zlib.compress(data))
            + _png_chunk(b"IEND", b""))


# ---- modes ----

def test_rgb_exact(tmp_path: Path) -> None:
    a = _rgb()
    Image.fromarray(a).save(tmp_path / "a.png")
    x = load_image(tmp_path / "a.png")
    assert x.shape == (3, 12, 10) and x.dtype == torch.float32
    torch.testing.assert_close(x, _unit(a), rtol=0, atol=1e-6)
    assert np.array_equal(to_uint8(x), a)


def test_rgba_composite_and_drop(tmp_path: Path) -> None:
    a = np.zeros((2, 3, 4), np.uint8)
    a[..., :3] = (200, 100, 50)
    a[..., 3] = [[0, 255, 128], [0, 255, 128]]
    Image.fromarray(a, "RGBA").save(tmp_path / "a.png")
    x = load_image(tmp_path / "a.png", background=(0, 0, 255))
    px = ((x + 1) * 127.5)[:, 0]  # [3, W] in 0..255
    torch.testing.assert_close(px[:, 0], torch.tensor([0.0, 0.0, 255.0]), atol=1e-3, rtol=0)  # transparent -> background
    torch.testing.assert_close(px[:, 1], torch.tensor([200.0, 100.0, 50.0]), atol=1e-3, rtol=0)
    half = 128 / 255
    expected = torch.tensor([200 * half, 100 * half, 50 * half + 255 * (1 - half)])
    torch.testing.assert_close(px[:, 2], expected, atol=1e-3, rtol=0)
    dropped = load_image(tmp_path / "a.png", alpha="drop")
    torch.testing.assert_close(dropped, _unit(a[..., :3]), atol=1e-6, rtol=0)


def test_palette_with_transparency_and_la(tmp_path: Path) -> None:
    p = Image.new("P", (4, 2))
    p.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    p.putdata([0, 1, 0, 1, 1, 1, 0, 0])
    p.info["transparency"] = 0  # index 0 (red) is transparent
    p.save(tmp_path / "p.png", transparency=0)
    x = to_uint8(load_image(tmp_path / "p.png", background=(10, 20, 30)))
    assert x[0, 0].tolist() == [10, 20, 30] and x[0, 1].tolist() == [0, 255, 0]
    la = np.stack([np.full((2, 2), 90, np.uint8), np.array([[0, 255], [255, 0]], np.uint8)], axis=2)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    y = to_uint8(load_image(tmp_path / "la.png", background=(0, 0, 0)))
    assert y[0, 0].tolist() == [0, 0, 0] and y[0, 1].tolist() == [90, 90, 90]


@pytest.mark.parametrize("mode", ["L", "1", "CMYK", "YCbCr"])
def test_other_modes_match_pillow_convert(tmp_path: Path, mode: str) -> None:
    im = Image.fromarray(_rgb()).convert(mode)
    suffix = ".jpg" if mode == "YCbCr" else ".tif"
    im.save(tmp_path / f"a{suffix}", **({"quality": 95} if suffix == ".jpg" else {}))
    expected = np.asarray(Image.open(tmp_path / f"a{suffix}").convert("RGB"))
    assert np.array_equal(to_uint8(load_image(tmp_path / f"a{suffix}")), expected)


@pytest.mark.parametrize("suffix", [".jpg", ".webp", ".bmp", ".tiff"])
def test_formats(tmp_path: Path, suffix: str) -> None:
    a = _rgb(16, 16)
    Image.fromarray(a).save(tmp_path / f"a{suffix}", **({"lossless": True} if suffix == ".webp" else {}))
    x = to_uint8(load_image(tmp_path / f"a{suffix}"))
    assert x.shape == (16, 16, 3)
    if suffix != ".jpg":
        assert np.array_equal(x, a)


def test_16bit_gray_keeps_precision(tmp_path: Path) -> None:
    g = np.array([[0, 1, 2], [65535, 32768, 257]], np.uint16)
    Image.fromarray(g).save(tmp_path / "g.png")
    x = load_image(tmp_path / "g.png")
    assert torch.all(x[0] == x[1]) and torch.all(x[1] == x[2])
    torch.testing.assert_close((x[0] + 1) / 2 * 65535, torch.from_numpy(g.astype(np.float32)), atol=0.02, rtol=0)


def test_16bit_rgb_round_trip(tmp_path: Path) -> None:
    a = RNG.integers(0, 65536, (9, 11, 3), dtype=np.uint16)
    png16.write_png16(tmp_path / "a.png", a)
    x = load_image(tmp_path / "a.png")
    torch.testing.assert_close(x, _unit(a, 65535.0), atol=1e-6, rtol=0)  # not 8-bit: 1/65535 steps survive
    save_png(tmp_path / "b.png", x, bits=16)
    with Image.open(tmp_path / "b.png") as im:  # Pillow reads it (as 8-bit)
        assert im.size == (11, 9) and im.mode == "RGB"
    assert np.array_equal(png16.read_png16(tmp_path / "b.png").pixels, a)


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_png16_reader_undoes_every_filter(tmp_path: Path, channels: int) -> None:
    a = RNG.integers(0, 65536, (10, 7, channels), dtype=np.uint16)
    (tmp_path / "f.png").write_bytes(_filtered_png16(a))
    assert np.array_equal(png16.read_png16(tmp_path / "f.png").pixels, a)
    if channels == 1:  # Pillow reads 16-bit gray exactly: an independent check of the test encoder
        assert np.array_equal(np.asarray(Image.open(tmp_path / "f.png")), a[..., 0])


@pytest.mark.parametrize(("h", "w", "channels"), [(13, 11, 1), (9, 17, 3), (1, 1, 4), (3, 2, 2), (8, 8, 1)])
def test_interlaced_png16_is_read_exactly(tmp_path: Path, h: int, w: int, channels: int) -> None:
    """Adam7 16-bit PNGs (issue 13 item 13): every size, including ones that leave passes empty."""
    a = RNG.integers(0, 65536, (h, w, channels), dtype=np.uint16)
    (tmp_path / "i.png").write_bytes(_filtered_png16(a, interlace=True))
    assert np.array_equal(png16.read_png16(tmp_path / "i.png").pixels, a)
    if channels == 1:  # Pillow reads interlaced 16-bit gray exactly: an independent decoder
        assert np.array_equal(np.asarray(Image.open(tmp_path / "i.png")), a[..., 0])
    x = load_image(tmp_path / "i.png")
    rgb = np.repeat(a, 3, axis=2) if channels == 1 else a[..., :3]
    if channels in (1, 3):  # no alpha: load_image keeps all 16 bits
        torch.testing.assert_close(x, _unit(rgb, 65535.0), atol=1e-6, rtol=0)


def test_png16_wavefront_matches_the_row_filters(tmp_path: Path) -> None:
    """A larger image whose rows mix all filters: the diagonal sweep gives the samples back."""
    a = RNG.integers(0, 65536, (67, 130, 3), dtype=np.uint16)
    a[20:40] = a[19]  # runs of equal rows, where Paeth and Average pick their other branches
    (tmp_path / "f.png").write_bytes(_filtered_png16(a))
    assert np.array_equal(png16.read_png16(tmp_path / "f.png").pixels, a)


def test_16bit_rgba_composite(tmp_path: Path) -> None:
    a = np.zeros((1, 2, 4), np.uint16)
    a[..., :3] = 65535
    a[0, :, 3] = [0, 65535]
    png16.write_png16(tmp_path / "a.png", a)
    x = load_image(tmp_path / "a.png", background=(0, 0, 0))
    assert x[:, 0, 0].tolist() == [-1.0, -1.0, -1.0] and x[:, 0, 1].tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_like_pillow(tmp_path: Path, orientation: int) -> None:
    a = _rgb(6, 4)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(a).save(tmp_path / "a.png", exif=exif)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "a.png")).convert("RGB"))
    assert np.array_equal(to_uint8(load_image(tmp_path / "a.png")), expected)


# ---- bad files ----

def _bad(path: Path, match: str) -> None:
    with pytest.raises(InputError, match=match) as err:
        load_image(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_bad_files(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    _bad(tmp_path / "empty.png", "empty file")
    (tmp_path / "text.png").write_text("hello, I am not a picture\n")
    _bad(tmp_path / "text.png", "not an image")
    _bad(tmp_path / "missing.png", "no such file")
    _bad(tmp_path, "directory")
    Image.fromarray(_rgb()).save(tmp_path / "a.gif")
    _bad(tmp_path / "a.gif", "not an image, or not a PNG")


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated(tmp_path: Path, suffix: str) -> None:
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / f"a{suffix}")
    data = (tmp_path / f"a{suffix}").read_bytes()
    (tmp_path / f"t{suffix}").write_bytes(data[: len(data) // 2])
    _bad(tmp_path / f"t{suffix}", "truncated or corrupt")


def test_truncated_16bit_png(tmp_path: Path) -> None:
    png16.write_png16(tmp_path / "a.png", RNG.integers(0, 65536, (32, 32, 3), dtype=np.uint16))
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    _bad(tmp_path / "t.png", "truncated PNG")


def test_decompression_bomb_refused_before_decoding(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "small.png")
    data = bytearray((tmp_path / "small.png").read_bytes())
    ihdr = bytearray(data[12:29])  # type + 13 data bytes
    ihdr[4:12] = struct.pack(">II", 100000, 100000)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    (tmp_path / "bomb.png").write_bytes(bytes(data))
    _bad(tmp_path / "bomb.png", "10000000000 pixels.*decompression bomb")
    with pytest.raises(InputError, match="claims 8 x 8 pixels, more than the limit of 10"):
        load_image(tmp_path / "small.png", max_pixels=10)


# ---- writing ----

def test_save_png_8bit_text_and_no_overwrite(tmp_path: Path) -> None:
    a = _rgb()
    text = {"vaetool:source": "x.safetensors", "note": "ünïcode ✓"}
    save_png(tmp_path / "o" / "a.png", _unit(a), text=text)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "o" / "a.png")), a)
    assert read_png_text(tmp_path / "o" / "a.png") == text
    with pytest.raises(OutputExistsError):
        save_png(tmp_path / "o" / "a.png", _unit(a) * 0)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "o" / "a.png")), a)
    save_png(tmp_path / "o" / "a.png", _unit(a) * 0, overwrite=True, bits=16, text={"k": "v"})
    assert read_png_text(tmp_path / "o" / "a.png") == {"k": "v"}
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["a.png"]  # no temp files left


def test_to_uint8_clips_and_rounds() -> None:
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0, float("nan")]).reshape(3, 1, 2)
    assert to_uint8(x).transpose(2, 0, 1).reshape(-1).tolist() == [0, 0, 128, 255, 255, 128]


@pytest.mark.parametrize("mode", ["replicate", "reflect"])
def test_pad_to_multiple_and_crop(mode: str) -> None:
    x = torch.arange(3 * 5 * 6, dtype=torch.float32).reshape(3, 5, 6)
    padded, size = pad_to_multiple(x, 4, mode)
    assert padded.shape == (3, 8, 8) and size == (5, 6)
    assert torch.equal(crop_to(padded, size), x)
    if mode == "replicate":
        assert torch.equal(padded[:, 7, :6], x[:, 4]) and torch.equal(padded[:, :5, 7], x[:, :, 5])
    else:
        assert torch.equal(padded[:, 5, :6], x[:, 3]) and torch.equal(padded[:, :5, 6], x[:, :, 4])
    same, size = pad_to_multiple(x[:, :4, :4], 4, mode)
    assert same.shape == (3, 4, 4) and size == (4, 4)
    batch, _ = pad_to_multiple(torch.zeros(2, 3, 9, 9), 8, mode)
    assert batch.shape == (2, 3, 16, 16)
