"""A Wan 2.1 video decode through the CLI within a budget: `vaetool video decode -c wan --random-weights`.

    python bench/bench_wan_video.py                                     # 33 frames at 480x832, bf16, 4GiB
    python bench/bench_wan_video.py --budgets 3GiB 2GiB                 # the runs of docs/memory.md
    python bench/bench_wan_video.py --frames 5 --size 64 96 --dtype fp32 --budgets off 1GiB   # smoke test

The latent is standard normal (seed 0), [1, 16, 1 + (frames - 1) / 4, H / 8, W / 8], written as a
whole-clip latent file (layout BCTHW) with the metadata `vaetool video encode` gives it. Each case
is one `python -m vaetool video decode LATENT -o DIR -c wan --random-weights --dtype D --json`
process (bench_cli_tiling.run_cli: wall, CPU, peak RSS from os.wait4); `off` is `--tile off`, a
budget is `--tile auto --max-memory BUDGET`; "plan" is what the JSON summary says ran (off, or the
tile order and edge). "within budget": the peak RSS is at most the budget
plus the baseline (the same command on a 1-frame 8 x 8 latent: the runtime and the weights).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cli_tiling import ROOT, run_baseline, run_cli

from vaetool import memory
from vaetool.api import load_vae
from vaetool.video.causal import causal_metadata, save_causal
from vaetool.video.store import video_metadata


def write_latent(path: Path, frames: int, height: int, width: int) -> None:
    """A random whole-clip Wan latent for `frames` frames of height x width px."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vae = load_vae("wan", random_weights=True, parts="decoder")
    latent_frames = 1 + (frames - 1) // 4
    z = torch.randn(1, 16, latent_frames, height // 8, width // 8, generator=torch.Generator().manual_seed(0))
    base = video_metadata(vae, fps=16.0, frames=frames, size=(height, width), scaled=False, source="bench")
    save_causal(path, z, causal_metadata(base, vae.latent_format, frames=frames, latent_frames=latent_frames, factor=4))


def main() -> None:
    """Run the cases and print a table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=33)
    ap.add_argument("--size", type=int, nargs=2, default=[480, 832], metavar=("H", "W"))
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--budgets", nargs="+", default=["4GiB"], help="`off` for untiled, or budgets such as 4GiB")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=3600)
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_latent(work / "clip.safetensors", args.frames, *args.size)
        write_latent(work / "tiny.safetensors", 1, 64, 64)
        common = ["-c", "wan", "--random-weights", "--dtype", args.dtype]
        base = run_baseline(["video", "decode", str(work / "tiny.safetensors"), "-o", str(work / "base"), *common, "--tile", "off"],
                            env, work)  # fmt: skip
        print(f"Wan video decode, {args.frames} frames at {args.size[0]}x{args.size[1]}, {args.dtype}, {args.threads} threads; "
              f"baseline (1 frame, 64 px): peak {base['peak'] / 2**20:.0f} MiB", flush=True)  # fmt: skip
        print("| case | plan | wall s | cpu s | s per frame | peak RSS MiB | peak - baseline MiB | within budget |")
        print("|---|---|---|---|---|---|---|---|")
        for i, case in enumerate(args.budgets):
            flags = ["--tile", "off"] if case == "off" else ["--tile", "auto", "--max-memory", case]
            out = work / f"{i}-{case.replace('.', '_')}"  # a case may repeat
            row = run_cli(["video", "decode", str(work / "clip.safetensors"), "-o", str(out), *common, *flags], env, work,
                          args.timeout, work / f"{out.name}.log")  # fmt: skip
            if "error" in row:
                print(f"| {case} | {row['error']} |", flush=True)
                continue
            within = "" if case == "off" else str(row["peak"] <= memory.parse_memory(case) + base["peak"])
            summary = json.loads((work / f"{out.name}.log").read_text())
            plan = summary["tile_mode"] if summary["tile_mode"] == "off" else f"{summary['tile_order']}, {summary['tile']} px"
            print(f"| {case} | {plan} | {row['wall']:.1f} | {row['cpu']:.1f} | {row['wall'] / args.frames:.2f} | {row['peak'] / 2**20:.0f} "
                  f"| {(row['peak'] - base['peak']) / 2**20:.0f} | {within} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
