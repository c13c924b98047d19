"""Calibrate the Wan video decode estimate (vaetool.tiling.causal_plan) against measured peak RSS.

    python bench/calibrate_wan_video.py                                  # the table of docs/memory.md
    python bench/calibrate_wan_video.py --cases 5:128x224:fp32:off 9:128x224:bf16:fast:64:tiles

A case is FRAMES:HxW:DTYPE:TILE[:ORDER], TILE `off` or `fast:N`, ORDER `frames` (default) or
`tiles`. Each case runs in a fresh process (`--point CASE`) as `vaetool video decode` runs it:
`configs/wan.yaml` with its seeded random weights in that dtype (decoder only), a standard-normal
latent (seed 0), `decode_causal` consumed frame by frame (uint8 frames, not written), after a
warm-up on a 2-latent-frame 64 px clip the same way, with glibc's mmap threshold fixed as the
CLI's causal decode fixes it (vaetool.memory.return_freed_memory; `--plain-malloc`: glibc's
default). The kernel's RSS high-water mark is reset (/proc/self/clear_refs) after the warm-up.
"measured" is the RSS growth during the decode plus the weights and the latent, which the
estimate counts; "pieces" is `video_need`'s sum before VIDEO_SCALE, "estimate" after. (The
CLI's whole-process peak is no use at these sizes: loading the random weights peaks higher than
a small decode.)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

from vaetool import memory
from vaetool.api import load_vae
from vaetool.tiling.causal_plan import estimate_video, video_need
from vaetool.video.causal import decode_causal

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CASES = [
    "5:128x224:fp32:off", "9:128x224:fp32:off", "9:128x224:fp32:fast:64", "9:128x224:fp32:fast:64:tiles",
    "9:240x416:fp32:off", "9:240x416:fp32:fast:128", "9:240x416:fp32:fast:128:tiles",
    "5:128x224:bf16:off", "9:128x224:bf16:off", "9:128x224:bf16:fast:64", "9:128x224:bf16:fast:64:tiles",
    "9:240x416:bf16:off", "9:240x416:bf16:fast:128", "9:240x416:bf16:fast:128:tiles", "9:240x416:bf16:fast:64:tiles",
]  # fmt: skip


class Case(NamedTuple):
    """One measured decode."""

    frames: int
    height: int
    width: int
    dtype: str
    tile: int | None
    order: str

    @classmethod
    def parse(cls, text: str) -> Case:
        """FRAMES:HxW:DTYPE:TILE[:ORDER] -> Case."""
        frames, size, dtype, *tile = text.split(":")
        height, width = map(int, size.split("x"))
        return cls(int(frames), height, width, dtype, int(tile[1]) if tile[0] == "fast" else None, tile[2] if len(tile) > 2 else "frames")

    def shape(self) -> tuple[int, ...]:
        """The latent [1, 16, t, h, w]."""
        return (1, 16, 1 + (self.frames - 1) // 4, self.height // 8, self.width // 8)


def _status(key: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def measure(case: Case, threads: int, plain: bool = False) -> dict[str, float]:
    """Decode one case in this process; bytes grown during the decode, resident before it, and wall seconds."""
    torch.set_num_threads(threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vae = load_vae("wan", random_weights=True, parts="decoder", dtype=DTYPES[case.dtype])

    def run(z: torch.Tensor, frames: int) -> None:
        for _ in decode_causal(vae, z, frames=frames, tile=case.tile, order=case.order):
            pass

    if not plain:
        memory.return_freed_memory()  # as `vaetool video decode` does
    run(torch.randn(1, 16, 2, 8, 8), 5)  # warm-up: oneDNN kernels, thread pools
    z = torch.randn(case.shape(), generator=torch.Generator().manual_seed(0))
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    start, t0 = _status("VmRSS"), time.perf_counter()
    run(z, case.frames)
    wall = time.perf_counter() - t0
    model = vae.model
    weights = sum(p.numel() * p.element_size() for m in (model.conv2, model.decoder) for p in m.parameters())
    return {"grown": _status("VmHWM") - start, "resident": weights + z.numel() * z.element_size(), "wall": wall}


def main() -> None:
    """Run the cases, each in its own process, and print measured against estimated peaks."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=CASES)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--point", help="measure one case in this process (JSON on stdout)")
    ap.add_argument("--plain-malloc", action="store_true", help="leave glibc's dynamic mmap threshold (what the CLI did before)")
    args = ap.parse_args()
    if args.point:
        print(json.dumps(measure(Case.parse(args.point), args.threads, args.plain_malloc)))
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models = {name: load_vae("wan", random_weights=True, parts="decoder", dtype=dt).model for name, dt in DTYPES.items()}
    print("| frames | size | dtype | tile | order | wall s | measured MiB | pieces MiB | estimate MiB | estimate / measured |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for text in args.cases:
        case = Case.parse(text)
        cmd = [sys.executable, __file__, "--point", text, "--threads", str(args.threads)]
        cmd += ["--plain-malloc"] if args.plain_malloc else []
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        point = json.loads(done.stdout.strip().splitlines()[-1])
        measured = point["grown"] + point["resident"]
        model, dtype = models[case.dtype], DTYPES[case.dtype]
        pieces = sum(video_need(model, case.shape(), dtype, case.tile, case.order).values())
        est = estimate_video(model, case.shape(), dtype, case.tile, case.order)
        order = case.order if case.tile else "-"
        print(f"| {case.frames} | {case.height}x{case.width} | {case.dtype} | {case.tile or 'off'} | {order} | {point['wall']:.1f} "
              f"| {measured / 2**20:.0f} | {pieces / 2**20:.0f} | {est / 2**20:.0f} | {est / measured:.3f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
