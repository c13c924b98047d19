"""16-bit PNG, written and read with zlib + struct (Pillow reads 48/64-bit colour PNGs as 8-bit and
cannot write them).

PNG is simple: a signature, then chunks (length, type, data, CRC-32). IHDR gives width, height, bit
depth, colour type and interlace; IDAT holds the zlib stream of rows, each prefixed by a filter
byte (0 None, 1 Sub, 2 Up, 3 Average, 4 Paeth) applied bytewise with `bpp` bytes per pixel.
The writer uses the Up filter (vectorised both ways); the reader undoes every filter, None/Sub/Up
with numpy and Average/Paeth with a per-byte loop (slow, only for files from other tools).
Interlaced (Adam7) files are not read here.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Png16", "PngFormatError", "check_text_key", "read_ihdr", "read_png16", "write_png16"]

SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # colour type -> samples per pixel (gray, RGB, gray+alpha, RGBA)
COLOR_TYPES = {v: k for k, v in CHANNELS.items()}
MAX_CHUNK = 2**31 - 1


class PngFormatError(ValueError):
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


def read_ihdr(path: str | Path) -> tuple[int, int, int, int, int] | None:
    """(width, height, bit depth, colour type, interlace) of a PNG file, or None if it is not one."""
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


def _paeth_row(row: np.ndarray, prev: np.ndarray, bpp: int) -> np.ndarray:
    out, up = bytearray(row.tobytes()), prev.tobytes()
    for i in range(len(out)):
        a = out[i - bpp] if i >= bpp else 0
        b = up[i]
        c = up[i - bpp] if i >= bpp else 0
        p = a + b - c
        pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
        out[i] = (out[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
    return np.frombuffer(out, np.uint8)


def _average_row(row: np.ndarray, prev: np.ndarray, bpp: int) -> np.ndarray:
    out, up = bytearray(row.tobytes()), prev.tobytes()
    for i in range(len(out)):
        a = out[i - bpp] if i >= bpp else 0
        out[i] = (out[i] + ((a + up[i]) >> 1)) & 0xFF
    return np.frombuffer(out, np.uint8)


# filter type -> (filtered row, reconstructed previous row, bytes per pixel) -> reconstructed row
UNFILTERS: dict[int, Callable[[np.ndarray, np.ndarray, int], np.ndarray]] = {
    0: lambda row, prev, bpp: row,
    1: lambda row, prev, bpp: np.cumsum(row.reshape(-1, bpp), axis=0, dtype=np.uint8).reshape(-1),  # Sub
    2: lambda row, prev, bpp: row + prev,  # Up (uint8 wraps modulo 256)
    3: _average_row,
    4: _paeth_row,
}


def _unfilter(raw: np.ndarray, bpp: int) -> np.ndarray:
    """Undo the per-row filters of raw [H, 1 + stride] -> bytes [H, stride]."""
    h, stride = raw.shape[0], raw.shape[1] - 1
    out = np.empty((h, stride), np.uint8)
    prev = np.zeros(stride, np.uint8)
    for y in range(h):
        unfilter = UNFILTERS.get(int(raw[y, 0]))
        if unfilter is None:
            raise PngFormatError(f"corrupt PNG (unknown filter type {int(raw[y, 0])} in row {y})")
        out[y] = unfilter(raw[y, 1:], prev, bpp)
        prev = out[y]
    return out


def read_png16(path: str | Path) -> Png16:
    """Decode a non-interlaced 16-bit PNG (any colour type but palette) to uint16 samples."""
    chunks = _chunks(Path(path).read_bytes())
    if chunks[0][0] != b"IHDR" or len(chunks[0][1]) != 13:
        raise PngFormatError("corrupt PNG (no IHDR chunk first)")
    w, h, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    if depth != 16 or color not in CHANNELS or interlace != 0:
        raise PngFormatError(f"not a plain 16-bit PNG (depth {depth}, colour type {color}, interlace {interlace})")
    c = CHANNELS[color]
    stream = zlib.decompressobj()
    try:
        data = b"".join(stream.decompress(d) for k, d in chunks if k == b"IDAT")
    except zlib.error as err:
        raise PngFormatError(f"corrupt PNG (bad image data: {err})") from None
    if not stream.eof or len(data) < h * (1 + w * c * 2):
        raise PngFormatError("truncated PNG (image data ends early)")
    raw = np.frombuffer(data, np.uint8, count=h * (1 + w * c * 2)).reshape(h, 1 + w * c * 2)
    pixels = _unfilter(raw, bpp=2 * c).view(">u2").reshape(h, w, c).astype(np.uint16)  # [H, W, C]
    trns = next((d for k, d in chunks if k == b"tRNS"), None)
    transparent = struct.unpack(f">{len(trns) // 2}H", trns) if trns and color in (0, 2) else None
    exif = next((d for k, d in chunks if k == b"eXIf"), None)
    return Png16(pixels, color, transparent, exif)
