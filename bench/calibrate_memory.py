"""Measure the peak memory of encode and decode on CPU and compare it with vaetool.memory's estimate.

Each point runs in a fresh subprocess (`--point CONFIG OP SIZE`): it loads the config with its
seeded random weights, warms the op up at 64 px, then measures the peak RSS of one call with
`vaetool.memory.measure_peak` (kernel high-water mark reset through /proc/self/clear_refs, glibc
mmap threshold fixed at 128 KiB so freed tensors leave the RSS at once). The measured peak is the
RSS growth during the call plus the weights and the input, which were resident before it.

    python bench/calibrate_memory.py                       # tiny-f8 and sd1, 128..768 px
    python bench/calibrate_memory.py --configs sd1 --sizes 256 512 --attention basic
    python bench/calibrate_memory.py --configs wan flux2 taesd --sizes 128 256 512
    python bench/calibrate_memory.py --configs wan --ops decode --sizes 512 --tile fast:128   # a tiled run vs estimate_tile_peak
    python bench/calibrate_memory.py --configs sd1 wan --sizes 256 512 --dtype bf16          # built in bf16 as the CLI builds it
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any

import torch

from vaetool import memory
from vaetool.memory_estimate import SAFETY
from vaetool.nn.attention import use_attention
from vaetool.tiling import Tiling

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _tiling(tile: str | None) -> Tiling:
    """`MODE:SIZE` (e.g. fast:128) as a Tiling; None: untiled."""
    if tile is None:
        return Tiling("off")
    mode, size = tile.split(":")
    return Tiling(mode, int(size))


def measure_point(
    config: str,
    op: str,
    size: int,
    attention: str,
    batch: int = 1,
    tile: str | None = None,
    dtype: str = "fp32",
    threads: int = 2,
) -> dict[str, Any]:
    """Measure one (config, op, size) in this process; returns bytes measured and resident before."""
    from vaetool.api import load_vae

    torch.set_num_threads(threads)
    # a config without weights: its seeded random ones, cast as the CLI casts them (on the CPU: NHWC conv weights)
    vae = load_vae(config, random_weights=True, dtype=DTYPES[dtype])
    f = vae.downscale

    def data(px: int) -> torch.Tensor:  # in the model's dtype, as the tiling entry point casts it before the estimate's call
        shape = (batch, 3, px, px) if op == "encode" else (batch, vae.model.embed_dim, px // f, px // f)
        return torch.randn(shape).to(vae.dtype)

    fn = {"encode": vae.moments, "decode": vae.decode}[op]
    tiling = _tiling(tile)

    def run(x: torch.Tensor) -> object:
        return fn(x, tiling=tiling)

    with use_attention(attention):
        run(data(64))  # warm-up: oneDNN kernels, thread pools
        x = data(size)
        grown = memory.measure_peak(lambda: run(x))
    weights = memory.architecture(vae).weights[op] * x.element_size()
    return {"config": config, "op": op, "size": size, "batch": batch, "attention": attention, "dtype": dtype,
            "grown": grown, "resident": weights + x.numel() * x.element_size()}  # fmt: skip


def run_point(
    config: str,
    op: str,
    size: int,
    attention: str,
    batch: int = 1,
    timeout: float = 600,
    tile: str | None = None,
    dtype: str = "fp32",
    threads: int = 2,
) -> dict[str, Any]:
    """Measure one point in a fresh subprocess (the RSS high-water mark is per process)."""
    cmd = [sys.executable, __file__, "--point", config, op, str(size), "--attention", attention, "--batch", str(batch)]
    cmd += ["--dtype", dtype, "--threads", str(threads)]
    cmd += [] if tile is None else ["--tile", tile]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    """Print measured peaks, the estimate and their ratio for each config, op and size."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["tiny-f8", "sd1"])
    parser.add_argument("--ops", nargs="+", default=["encode", "decode"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[128, 256, 512, 768])
    parser.add_argument("--attention", default="sdpa")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tile", help="MODE:SIZE, e.g. fast:128: measure tiled runs against estimate_tile_peak")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="build the model (and size the estimate) in this dtype")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each point (memory barely depends on it)")
    parser.add_argument("--point", nargs=3, metavar=("CONFIG", "OP", "SIZE"))
    args = parser.parse_args()
    if args.point:
        config, op, size = args.point
        print(json.dumps(measure_point(config, op, int(size), args.attention, args.batch, args.tile, args.dtype, args.threads)))
        return
    dtype = DTYPES[args.dtype]
    print("| config | op | px | dtype | batch | tiles | measured MiB | estimate MiB | estimate / measured | without SAFETY |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for config in args.configs:
        for op in args.ops:
            for size in args.sizes:
                point = run_point(config, op, size, args.attention, args.batch, tile=args.tile, dtype=args.dtype, threads=args.threads)
                measured = point["grown"] + point["resident"]
                if args.tile is None:
                    est = memory.estimate_peak(config, op, size, size, args.batch, dtype, attention=args.attention)
                else:
                    tiles = _tiling(args.tile)
                    est = memory.estimate_tile_peak(config, op, tiles.tile_size, args.batch, dtype, mode=tiles.mode,  # type: ignore[arg-type]
                                                    height=size, width=size, attention=args.attention)  # fmt: skip
                print(
                    f"| {config} | {op} | {size} | {args.dtype} | {args.batch} | {args.tile or 'off'} | {measured / 2**20:.1f} "
                    f"| {est / 2**20:.1f} | {est / measured:.3f} | {est / SAFETY / measured:.3f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
