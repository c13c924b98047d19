"""Tiled vs untiled encode/decode of the Wan 2.1, Flux.2 and TAESD VAEs at full width with random weights (CPU).

    python bench/bench_tiling_families.py                               # wan flux2 taesd, 256 and 512 px, tiles of half the size
    python bench/bench_tiling_families.py --configs flux2 --sizes 256 --ops decode --tile-stats

Weights: the shipped config's seeded random weights (`load_vae(config, random_weights=True)`).
Input: examples/images/chelsea.png resized (bicubic) to the size; decode cases decode the latent
(posterior mean) of the untiled encode of that image. PSNR is over the untiled output's value range
(encode: the posterior mean), as in bench/bench_tiling.py; time is the wall time of one run after
an untiled warm-up at that size (the machine is shared: compare ratios). `--tile-stats` adds, for the coders with
GroupNorm (Flux.2), fast tiles whose GroupNorm uses each tile's own statistics (naive tiling), to
show what fast mode's fixed statistics buy.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vaetool import tiling
from vaetool.api import load_vae
from vaetool.tiling.archs import coder_program
from vaetool.tiling.exact import run_program
from vaetool.tiling.fast import _cut, run_tiled

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "examples" / "images" / "chelsea.png"


def make_image(size: int) -> torch.Tensor:
    """The test image at size x size, [1, 3, S, S] in [-1, 1]."""
    img = Image.open(IMAGE).convert("RGB").resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 127.5 - 1.0


def psnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR of `out` against `ref` over the reference's value range."""
    mse = (out.double() - ref.double()).square().mean().item()
    rng = (ref.max() - ref.min()).item()
    return math.inf if mse == 0 else 10 * math.log10(rng * rng / mse)


def decode_tile_stats(model: torch.nn.Module, z: torch.Tensor, tile: int) -> torch.Tensor:
    """Fast-mode tiles whose GroupNorms normalise with each tile's own statistics (no shared estimate)."""
    program = coder_program(model, "decode")
    f = round(program.factor)
    head, tail = program.split(_cut(program, True))
    t, o = tile // f, tile // 4 // f
    h = run_program(head, z, t) if head.ops else z
    return run_tiled(tail, h, t + o, o, 1, None, (z.shape[2] * f, z.shape[3] * f))  # type: ignore[arg-type]


def timed(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
    """fn's result and its wall time."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


@torch.inference_mode()
def bench(config: str, size: int, ops: list[str], tile_stats: bool) -> None:
    """Print one table row per (op, mode) of `config` at `size` px."""
    model = load_vae(config, random_weights=True).model.eval()
    tile = size // 2
    x = make_image(size)
    model.decode(model.encode_moments(x)[:, : model.embed_dim])  # warm-up at this size (oneDNN's kernels for its shapes)
    moments, t_enc = timed(lambda: model.encode_moments(x))
    z = moments[:, : model.embed_dim]
    for op in ops:
        if op == "encode":
            ref, base = z, t_enc
            cases = {f"exact:{tile}": lambda: tiling.encode_exact(model, x, tile_size=tile)[:, : model.embed_dim],
                     f"fast:{tile}": lambda: tiling.encode_fast(model, x, tile_size=tile)[:, : model.embed_dim]}  # fmt: skip
        else:
            ref, base = timed(lambda: model.decode(z))
            cases = {f"exact:{tile}": lambda: tiling.decode_exact(model, z, tile_size=tile),
                     f"fast:{tile}": lambda: tiling.decode_fast(model, z, tile_size=tile)}  # fmt: skip
            if tile_stats and coder_program(model, "decode").normalized():
                cases[f"fast:{tile}, per-tile GroupNorm"] = lambda: decode_tile_stats(model, z, tile)
        print(f"| {config} | {op} | {size} | off | {base:.1f} | reference | |", flush=True)
        for name, fn in cases.items():
            out, seconds = timed(fn)
            diff = (out - ref).abs().max().item()
            print(f"| {config} | {op} | {size} | {name} | {seconds:.1f} | {psnr(out, ref):.1f} | {diff:.2g} |", flush=True)


def main() -> None:
    """Run the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["wan", "flux2", "taesd"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[256, 512])
    parser.add_argument("--ops", nargs="+", default=["decode", "encode"])
    parser.add_argument("--tile-stats", action="store_true", help="also fast tiles with per-tile GroupNorm statistics")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*random weights.*")
    print("| config | op | px | mode | time s | PSNR dB vs off | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for config in args.configs:
        for size in args.sizes:
            bench(config, size, args.ops, args.tile_stats)


if __name__ == "__main__":
    main()
