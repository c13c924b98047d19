"""16-bit PNG reading: vaetool's anti-diagonal sweep vs a per-byte loop for Average/Paeth rows.

    python bench/bench_png16.py                  # 256, 512 and 1024 px RGB, every row Paeth
    python bench/bench_png16.py --sizes 2048 --no-loop

The files are random 16-bit RGB samples with every row Paeth-filtered (the slowest filter, and
what encoders pick for photos), written with zlib level 1. "sweep" is vaetool.io.png16.read_png16;
"loop" undoes the same rows with the per-byte Python loop png16 used before (one row at a time,
each byte after its left neighbour): the cost a small, highly compressible Paeth file used to
impose. Both outputs are checked equal to the samples. Times are the best of --repeats runs (the
machine is shared: compare ratios, not absolute times).
"""

from __future__ import annotations

import argparse
import struct
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from vaetool.io import png16


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def paeth_png(samples: np.ndarray) -> bytes:
    """uint16 [H, W, 3] -> a 16-bit RGB PNG whose every row is Paeth-filtered."""
    h, w, c = samples.shape
    bpp = 2 * c
    rows = samples.astype(">u2").view(np.uint8).reshape(h, w * bpp).astype(np.int64)
    up = np.vstack([np.zeros((1, w * bpp), np.int64), rows[:-1]])  # [H, stride]
    left = np.hstack([np.zeros((h, bpp), np.int64), rows[:, :-bpp]])
    upleft = np.hstack([np.zeros((h, bpp), np.int64), up[:, :-bpp]])
    p = left + up - upleft
    pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - upleft)
    pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
    data = np.hstack([np.full((h, 1), 4, np.uint8), ((rows - pred) % 256).astype(np.uint8)])
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return png16.SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(data.tobytes(), 1)) + _chunk(b"IEND", b"")


def loop_decode(blob: bytes, w: int, h: int, bpp: int) -> np.ndarray:
    """The per-byte Paeth loop: raw rows -> uint16 [H, W, 3]."""
    idat = b"".join(d for k, d in png16._chunks(blob) if k == b"IDAT")
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + w * bpp)
    prev = bytearray(w * bpp)
    out = []
    for y in range(h):
        row = bytearray(raw[y, 1:].tobytes())
        for i in range(len(row)):
            a = row[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            row[i] = (row[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        out.append(bytes(row))
        prev = row
    return np.frombuffer(b"".join(out), ">u2").reshape(h, w, bpp // 2).astype(np.uint16)


def best_of(repeats: int, fn: Callable[[], np.ndarray]) -> tuple[float, np.ndarray]:
    """The fastest of `repeats` calls and the last result."""
    times, result = [], np.empty(0)
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    """Time both decoders on all-Paeth files of each size and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-loop", action="store_true", help="time the sweep only (the loop takes minutes past 1024 px)")
    args = parser.parse_args()
    print(f"{'size':>6} {'file KiB':>9} {'sweep s':>8} {'loop s':>8} {'speed-up':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            samples = np.random.default_rng(size).integers(0, 65536, (size, size, 3), dtype=np.uint16)
            blob = paeth_png(samples)
            path = Path(tmp) / f"paeth{size}.png"
            path.write_bytes(blob)
            sweep, pixels = best_of(args.repeats, lambda: png16.read_png16(path).pixels)  # noqa: B023 - called at once
            assert np.array_equal(pixels, samples)
            loop = float("nan")
            if not args.no_loop:
                loop, pixels = best_of(args.repeats, lambda: loop_decode(blob, size, size, 6))  # noqa: B023
                assert np.array_equal(pixels, samples)
            print(f"{size:>6} {len(blob) / 1024:>9.0f} {sweep:>8.2f} {loop:>8.2f} {loop / sweep:>8.1f}")


if __name__ == "__main__":
    main()
