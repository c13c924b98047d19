"""A Wan 2.1 video encode through the CLI, untiled and in fast tiles: `vaetool video encode -c wan --random-weights`.

    python bench/bench_wan_video_encode.py                     # 5 frames at 256x256, fp32: off, fast 128 px, 1GiB, 700MiB
    python bench/bench_wan_video_encode.py --frames 5 --size 64 96 --cases off fast:32 --threads 1   # smoke test

The clip: examples/images/chelsea.png resized (bicubic) to H x (W + 2 * frames) and panned 2 px a
frame, written as a PNG folder. Each case is one `python -m vaetool video encode CLIP -o LATENT -c wan
--random-weights --dtype D --json` process (bench_cli_tiling.run_cli: wall, CPU, peak RSS from
os.wait4): `off` is `--tile off`, `fast:N` is `--tile fast --tile-size N`, a budget is `--tile auto
--max-memory BUDGET`. "within budget": the peak RSS is at most the budget plus the baseline (the
same command on one 64 x 64 frame, untiled: the runtime and the weights). PSNR: the latent mean
against the `off` case's, over its value range.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cli_tiling import IMAGE, ROOT, psnr, run_baseline, run_cli

from vaetool import memory
from vaetool.video.causal import load_causal


def write_clip(folder: Path, frames: int, height: int, width: int) -> None:
    """`frames` PNGs of height x width: chelsea.png panned 2 px a frame."""
    folder.mkdir()
    with Image.open(IMAGE) as im:
        wide = np.asarray(im.convert("RGB").resize((width + 2 * frames, height), Image.Resampling.BICUBIC))
    for i in range(frames):
        Image.fromarray(wide[:, 2 * i : 2 * i + width]).save(folder / f"f{i:03d}.png")


def flags(case: str) -> list[str]:
    """The CLI's tiling flags for a case: off, fast:N or a budget."""
    if case == "off":
        return ["--tile", "off"]
    if case.startswith("fast:"):
        return ["--tile", "fast", "--tile-size", case.removeprefix("fast:")]
    return ["--tile", "auto", "--max-memory", case]


def main() -> None:
    """Run the cases and print a table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=5)
    ap.add_argument("--size", type=int, nargs=2, default=[256, 256], metavar=("H", "W"))
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--cases", nargs="+", default=["off", "fast:128", "1GiB", "700MiB"], help="off, fast:TILE_PX or a budget")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=3600)
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    common = ["-c", "wan", "--random-weights", "--dtype", args.dtype]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_clip(work / "clip", args.frames, *args.size)
        write_clip(work / "tiny", 1, 64, 64)
        base = run_baseline(["video", "encode", str(work / "tiny"), "-o", str(work / "base.safetensors"), *common, "--tile", "off"],
                            env, work)  # fmt: skip
        print(f"Wan video encode, {args.frames} frames at {args.size[0]}x{args.size[1]}, {args.dtype}, {args.threads} threads; "
              f"baseline (1 frame, 64 px): peak {base['peak'] / 2**20:.0f} MiB", flush=True)  # fmt: skip
        print("| case | plan | wall s | cpu s | peak RSS MiB | peak - baseline MiB | within budget | PSNR vs off dB |")
        print("|---|---|---|---|---|---|---|---|")
        reference = None
        for i, case in enumerate(args.cases):
            name = f"{i}-" + case.replace(".", "_").replace(":", "_")  # a case may repeat
            out, log = work / f"{name}.safetensors", work / f"{name}.log"
            row = run_cli(["video", "encode", str(work / "clip"), "-o", str(out), *common, *flags(case)], env, work, args.timeout, log)
            if "error" in row:
                print(f"| {case} | {row['error']} |", flush=True)
                continue
            summary = json.loads(log.read_text())
            plan = summary["tile_mode"] + (f" {summary['tile']} px" if summary["tile"] else "")
            mean = load_causal(out, 4).latents  # [1, 16, T', h, w]
            reference = mean if case == "off" and reference is None else reference
            db = "" if reference is None or case == "off" else f"{psnr(mean, reference):.1f}"
            within = "" if case == "off" or case.startswith("fast:") else str(row["peak"] <= memory.parse_memory(case) + base["peak"])
            print(f"| {case} | {plan} | {row['wall']:.1f} | {row['cpu']:.1f} | {row['peak'] / 2**20:.0f} "
                  f"| {(row['peak'] - base['peak']) / 2**20:.0f} | {within} | {db} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
