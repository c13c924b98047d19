"""16-bit PNG, written and read with zlib + struct (Pillow reads 48/64-bit colour PNGs as 8-bit and
cannot write them).

PNG is simple: a signature, then chunks (length, type, data, CRC-32). IHDR gives width, height, bit
depth, colour type and interlace; IDAT holds the zlib stream of rows, each prefixed by a filter
byte (0 None, 1 Sub, 2 Up, 3 Average, 4 Paeth) applied bytewise with `bpp` bytes per pixel.
The writer uses the Up filter (vectorised both ways); the reader undoes every filter, None/Sub/Up
row by row with numpy, and files with Average/Paeth rows in one vectorised sweep over the
anti-diagonals. Interlaced (Adam7) files are read pass by pass. The reader trusts nothing the file
declares: the pixel count is bounded and the image data is inflated no further than it needs.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vaetool.errors import InputError
from vaetool.limits import MAX_PIXELS

__all__ = ["Png16", "PngFormatError", "check_text_key", "read_ihdr", "read_png16", "write_png16"]

SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # colour type -> samples per pixel (gray, RGB, gray+alpha, RGBA)
COLOR_TYPES = {v: k for k, v in CHANNELS.items()}
MAX_CHUNK = 2**31 - 1


class PngFormatError(InputError, ValueError):
    """A PNG stream that is truncated, corrupt, or uses a feature this reader does not handle."""


@dataclass
class Png16:
    """A decoded 16-bit PNG: samples [H, W, channels] uint16, tRNS key colour, raw eXIf bytes."""

    pixels: np.ndarray
    color_type: int
    transparent: tuple[int, ...] | None
    exif: bytes | None


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def check_text_key(key: str) -> bytes:
    """A PNG text keyword as bytes: 1-79 Latin-1 characters without NUL (ValueError otherwise)."""
    try:
        raw = key.encode("latin-1")
    except UnicodeEncodeError:
        raw = b""
    if not 1 <= len(raw) <= 79 or b"\0" in raw:
        raise ValueError(f"a PNG text key must be 1-79 Latin-1 characters without NUL, not {key!r}")
    return raw


def _text_chunk(key: str, value: str) -> bytes:
    """tEXt when the value is Latin-1, else iTXt (UTF-8, uncompressed)."""
    raw = check_text_key(key)
    try:
        return _chunk(b"tEXt", raw + b"\0" + value.encode("latin-1"))
    except UnicodeEncodeError:
        return _chunk(b"iTXt", raw + b"\0\0\0\0\0" + value.encode("utf-8"))


def write_png16(path: str | Path, pixels: np.ndarray, text: dict[str, str] | None = None, level: int = 6) -> None:
    """Write uint16 samples [H, W, C] (C = 1, 2, 3 or 4) as a 16-bit PNG, with text chunks."""
    if pixels.dtype != np.uint16 or pixels.ndim != 3 or pixels.shape[2] not in COLOR_TYPES:
        raise ValueError(f"expected uint16 [H, W, 1|2|3|4], got {pixels.dtype} {tuple(pixels.shape)}")
    h, w, c = pixels.shape
    rows = np.ascontiguousarray(pixels, dtype=">u2").view(np.uint8).reshape(h, w * c * 2)  # [H, W*C*2] big-endian bytes
    filtered = rows.copy()
    filtered[1:] -= rows[:-1]  # Up filter, modulo 256
    data = np.concatenate([np.full((h, 1), 2, np.uint8), filtered], axis=1)  # [H, 1 + W*C*2]
    ihdr = struct.pack(">IIBBBBB", w, h, 16, COLOR_TYPES[c], 0, 0, 0)
    chunks = [_chunk(b"IHDR", ihdr)]
    chunks += [_text_chunk(k, v) for k, v in (text or {}).items()]
    chunks += [_chunk(b"IDAT", zlib.compress(data.tobytes(), level)), _chunk(b"IEND", b"")]
    Path(path).write_bytes(SIGNATURE + b"".join(chunks))


def read_ihdr(path: str | Path | bytes) -> tuple[int, int, int, int, int, int, int] | None:
    """(width, height, bit depth, colour type, compression, filter, interlace) of a PNG file or its bytes, or None if not a PNG."""
    if isinstance(path, bytes):
        head = path[:33]
    else:
        with open(path, "rb") as f:
            head = f.read(33)
    if len(head) < 33 or head[:8] != SIGNATURE or head[12:16] != b"IHDR":
        return None
    return struct.unpack(">IIBBBBB", head[16:29])


def _chunks(blob: bytes) -> list[tuple[bytes, bytes]]:
    """Split a PNG into (type, data) chunks up to IEND, checking lengths and CRCs."""
    if blob[:8] != SIGNATURE:
        raise PngFormatError("not a PNG file")
    pos, out = 8, []
    while True:
        if pos + 8 > len(blob):
            raise PngFormatError("truncated PNG (no IEND chunk)")
        n, kind = struct.unpack(">I4s", blob[pos : pos + 8])
        end = pos + 8 + n + 4
        if n > MAX_CHUNK or end > len(blob):
            raise PngFormatError(f"truncated PNG ({kind.decode('latin-1')} chunk cut off)")
        data = blob[pos + 8 : pos + 8 + n]
        (crc,) = struct.unpack(">I", blob[end - 4 : end])
        if zlib.crc32(kind + data) & 0xFFFFFFFF != crc:
            raise PngFormatError(f"corrupt PNG (bad CRC in the {kind.decode('latin-1')} chunk)")
        out.append((kind, data))
        if kind == b"IEND":
            return out
        pos = end


# filter type -> (filtered row, reconstructed previous row, bytes per pixel) -> reconstructed row
ROW_UNFILTERS: dict[int, Callable[[np.ndarray, np.ndarray, int], np.ndarray]] = {
    0: lambda row, prev, bpp: row,
    1: lambda row, prev, bpp: np.cumsum(row.reshape(-1, bpp), axis=0, dtype=np.uint8).reshape(-1),  # Sub
    2: lambda row, prev, bpp: row + prev,  # Up (uint8 wraps modulo 256)
}
# Adam7: (first row, first column, row step, column step) of each of the seven passes
ADAM7 = ((0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2), (0, 1, 2, 2), (1, 0, 2, 1))


def _predict(kind: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """The predictor of each filter type from left a, up b, up-left c (int16 [N, bpp]; kind [N, 1])."""
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
    return np.select([kind == 0, kind == 1, kind == 2, kind == 3], [np.zeros_like(a), a, b, (a + b) >> 1], paeth)


def _unfilter_wavefront(filtered: np.ndarray, kinds: np.ndarray, bpp: int) -> np.ndarray:
    """Undo any mix of filters on filtered [H, W, bpp] (row filter types kinds [H]) -> bytes [H, W, bpp].

    Pixel (y, x) needs only (y, x-1), (y-1, x) and (y-1, x-1), so every anti-diagonal y + x = d is
    done at once: H + W - 1 vectorised steps instead of a Python loop over every byte.
    """
    h, w, _ = filtered.shape
    out = np.zeros((h + 1, w + 1, bpp), np.int16)  # [H+1, W+1, bpp]: row 0 and column 0 are the zero border
    f = filtered.astype(np.int16)
    kind = kinds.astype(np.int16)[:, None]  # [H, 1]
    for d in range(h + w - 1):
        y = np.arange(max(0, d - w + 1), min(h, d + 1))  # [N] rows on this diagonal
        x = d - y
        pred = _predict(kind[y], out[y + 1, x], out[y, x + 1], out[y, x])  # [N, bpp]
        out[y + 1, x + 1] = (f[y, x] + pred) & 0xFF
    return out[1:, 1:].astype(np.uint8)


def _unfilter(raw: np.ndarray, bpp: int) -> np.ndarray:
    """Undo the per-row filters of raw [H, 1 + stride] -> bytes [H, stride]."""
    h, stride = raw.shape[0], raw.shape[1] - 1
    kinds = raw[:, 0]
    if (bad := np.flatnonzero(kinds > 4)).size:
        raise PngFormatError(f"corrupt PNG (unknown filter type {int(kinds[bad[0]])} in row {int(bad[0])})")
    if np.any(kinds > 2):  # Average or Paeth rows: the diagonal sweep
        return _unfilter_wavefront(raw[:, 1:].reshape(h, -1, bpp), kinds, bpp).reshape(h, stride)
    out = np.empty((h, stride), np.uint8)
    prev = np.zeros(stride, np.uint8)
    for y in range(h):
        out[y] = ROW_UNFILTERS[int(kinds[y])](raw[y, 1:], prev, bpp)
        prev = out[y]
    return out


def _passes(w: int, h: int, interlace: int) -> list[tuple[int, int, int, int, int, int]]:
    """(first row, first column, row step, column step, pass height, pass width) of each non-empty pass."""
    grid = ADAM7 if interlace else ((0, 0, 1, 1),)
    sizes = [(y0, x0, dy, dx, -(-(h - y0) // dy), -(-(w - x0) // dx)) for y0, x0, dy, dx in grid]
    return [p for p in sizes if p[4] > 0 and p[5] > 0]


def _inflate(parts: list[bytes], expected: int, size: str) -> bytes:
    """The zlib stream of the IDAT chunks, never more than `expected` bytes (a bomb stops at the bound)."""
    stream, out = zlib.decompressobj(), bytearray()
    try:
        for part in parts:
            out += stream.decompress(part, expected + 1 - len(out))
            if len(out) > expected:
                raise PngFormatError(f"corrupt PNG (its image data inflates past the {expected} bytes a {size} image holds)")
    except zlib.error as err:
        raise PngFormatError(f"corrupt PNG (bad image data: {err})") from None
    if not stream.eof or len(out) < expected:
        raise PngFormatError("truncated PNG (image data ends early)")
    return bytes(out)


def _transparent(trns: bytes | None, color: int) -> tuple[int, ...] | None:
    """The tRNS key colour of a gray or RGB image (None without one; ignored for types with alpha)."""
    if trns is None or color not in (0, 2):
        return None
    if len(trns) != 2 * CHANNELS[color]:
        raise PngFormatError(f"corrupt PNG (a {len(trns)}-byte tRNS chunk; a 16-bit "
                             f"{'gray' if color == 0 else 'RGB'} image needs {2 * CHANNELS[color]})")
    return struct.unpack(f">{CHANNELS[color]}H", trns)


def read_png16(path: str | Path | bytes, max_pixels: int = MAX_PIXELS) -> Png16:
    """Decode a 16-bit PNG file or its bytes (any colour type but palette, interlaced or not) to uint16 samples.

    The declared size is checked against `max_pixels` and the image data is inflated no further
    than that size needs, so a small hostile file cannot make it allocate more.
    """
    chunks = _chunks(path if isinstance(path, bytes) else Path(path).read_bytes())
    if chunks[0][0] != b"IHDR" or len(chunks[0][1]) != 13:
        raise PngFormatError("corrupt PNG (no IHDR chunk first)")
    w, h, depth, color, compression, filtering, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    if depth != 16 or color not in CHANNELS or compression or filtering or interlace > 1:
        raise PngFormatError(f"not a 16-bit PNG this reader handles (depth {depth}, colour type {color}, "
                             f"compression {compression}, filter {filtering}, interlace {interlace})")
    if w == 0 or h == 0:
        raise PngFormatError(f"corrupt PNG (it declares {w} x {h} pixels)")
    if w * h > max_pixels:
        raise PngFormatError(f"refusing to decode: the image claims {w} x {h} pixels, more than the limit of "
                             f"{max_pixels} (a decompression bomb?)")
    c = CHANNELS[color]
    bpp = 2 * c
    passes = _passes(w, h, interlace)
    expected = sum(ph * (1 + pw * bpp) for *_, ph, pw in passes)
    data = _inflate([d for k, d in chunks if k == b"IDAT"], expected, f"{w} x {h}")
    transparent = _transparent(next((d for k, d in chunks if k == b"tRNS"), None), color)
    samples = np.empty((h, w * bpp), np.uint8)  # [H, W*bpp] big-endian bytes
    rows = samples.reshape(h, w, bpp)
    offset = 0
    for y0, x0, dy, dx, ph, pw in passes:
        raw = np.frombuffer(data, np.uint8, count=ph * (1 + pw * bpp), offset=offset).reshape(ph, 1 + pw * bpp)
        rows[y0::dy, x0::dx] = _unfilter(raw, bpp).reshape(ph, pw, bpp)  # [ph, pw, bpp]
        offset += raw.size
    pixels = samples.view(">u2").reshape(h, w, c).astype(np.uint16)  # [H, W, C]
    exif = next((d for k, d in chunks if k == b"eXIf"), None)
    return Png16(pixels, color, transparent, exif)
