"""Calibrate the Wan video decode and encode estimates (vaetool.tiling.causal_plan, causal_encode) against measured peak RSS.

    python bench/calibrate_wan_video.py                                  # the decode table of docs/memory.md
    python bench/calibrate_wan_video.py --cases 5:128x224:fp32:off 9:128x224:bf16:fast:64:tiles
    python bench/calibrate_wan_video.py --cases encode                   # the encode table (ENCODE_CASES)
    python bench/calibrate_wan_video.py --cases encode:9:128x224:bf16:fast:64

A case is [OP:]FRAMES:HxW:DTYPE:TILE[:ORDER], OP `decode` (default) or `encode`, TILE `off` or
`fast:N`, ORDER `frames` (default) or `tiles` (decode only); `--cases encode` (or `decode`) runs
that op's whole list. Each decode case runs in a fresh process (`--point CASE`) as `vaetool video decode` runs it:
`configs/wan.yaml` with its seeded random weights in that dtype (decoder only), a standard-normal
latent (seed 0), `decode_causal` consumed frame by frame (uint8 frames, not written), after a
warm-up on a 2-latent-frame 64 px clip the same way, with glibc's mmap threshold fixed as the
CLI's causal decode fixes it (vaetool.memory.return_freed_memory; `--plain-malloc`: glibc's
default). The kernel's RSS high-water mark is reset (/proc/self/clear_refs) after the warm-up.
"measured" is the RSS growth during the decode plus the weights and the latent, which the
estimate counts; "pieces" is `video_need`'s sum before VIDEO_SCALE, "estimate" after. (The
CLI's whole-process peak is no use at these sizes: loading the random weights peaks higher than
a small decode.)

An encode case runs as `vaetool video encode` runs it (vaetool.jobs.video_causal.encode_clip):
random frames in [-1, 1] (float32 [3, H, W], seed 0, as vaetool.video.frames decodes them) held
in a list through `encode_causal` (untiled, or `encode_video_fast` with fast tiles of N px and the
default overlap), the encoder only, after a warm-up on a 5-frame 64 px clip the same way.
"measured" adds the encoder's weights and the frame list to the RSS growth; "estimate" is
`video_encode_need` (pieces: the same, it has no scale).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch

from vaetool import memory
from vaetool.api import Vae, load_vae
from vaetool.tiling.causal_encode import video_encode_need
from vaetool.tiling.causal_plan import estimate_video, video_need
from vaetool.video.causal import decode_causal, encode_causal
from vaetool.video.frames import Frame

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CASES = [
    "5:128x224:fp32:off", "9:128x224:fp32:off", "9:128x224:fp32:fast:64", "9:128x224:fp32:fast:64:tiles",
    "9:240x416:fp32:off", "9:240x416:fp32:fast:128", "9:240x416:fp32:fast:128:tiles",
    "5:128x224:bf16:off", "9:128x224:bf16:off", "9:128x224:bf16:fast:64", "9:128x224:bf16:fast:64:tiles",
    "9:240x416:bf16:off", "9:240x416:bf16:fast:128", "9:240x416:bf16:fast:128:tiles", "9:240x416:bf16:fast:64:tiles",
]  # fmt: skip
ENCODE_CASES = [
    f"encode:{n}:{size}:{dtype}:{tile}" for dtype in DTYPES for size, fast in (("128x224", "fast:64"), ("240x416", "fast:128"))
    for n in (5, 9) for tile in ("off", fast)
]  # fmt: skip
LISTS = {"decode": CASES, "encode": ENCODE_CASES}


class Case(NamedTuple):
    """One measured decode or encode."""

    op: str
    frames: int
    height: int
    width: int
    dtype: str
    tile: int | None
    order: str

    @classmethod
    def parse(cls, text: str) -> Case:
        """[OP:]FRAMES:HxW:DTYPE:TILE[:ORDER] -> Case."""
        fields = text.split(":")
        op = fields.pop(0) if fields[0] in LISTS else "decode"
        frames, size, dtype, *tile = fields
        height, width = map(int, size.split("x"))
        order = tile[2] if len(tile) > 2 else "frames"
        return cls(op, int(frames), height, width, dtype, int(tile[1]) if tile[0] == "fast" else None, order)

    def shape(self) -> tuple[int, ...]:
        """The latent [1, 16, t, h, w]."""
        return (1, 16, 1 + (self.frames - 1) // 4, self.height // 8, self.width // 8)


def _status(key: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key + ":"))
    return int(line.split()[1]) * 1024


class Op(NamedTuple):
    """How to load, run and estimate one op: the coder loaded, the warm-up and measured inputs, the run."""

    parts: str
    inputs: Callable[[Case], tuple[Any, Any]]  # (warm-up input, measured input)
    run: Callable[[Vae, Case, Any], None]
    weights: Callable[[torch.nn.Module], list[torch.nn.Module]]  # the modules whose weights the estimate counts
    pieces: Callable[[torch.nn.Module, Case], int]  # the estimate before any scale
    estimate: Callable[[torch.nn.Module, Case], int]


def _latents(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(1, 16, 2, 8, 8), torch.randn(case.shape(), generator=torch.Generator().manual_seed(0))


def _decode(vae: Vae, case: Case, z: torch.Tensor) -> None:
    for _ in decode_causal(vae, z, frames=1 + 4 * (z.shape[2] - 1), tile=case.tile, order=case.order):
        pass


def _frames(case: Case) -> tuple[list[Frame], list[Frame]]:
    gen = torch.Generator().manual_seed(0)
    warm = [Frame(f"frame {i}", torch.rand(3, 64, 64) * 2 - 1) for i in range(5)]
    return warm, [Frame(f"frame {i}", torch.rand(3, case.height, case.width, generator=gen) * 2 - 1) for i in range(case.frames)]


def _encode(vae: Vae, case: Case, frames: list[Frame]) -> None:
    encode_causal(vae, frames, tile=case.tile)  # as vaetool.jobs.video_causal.encode_clip, the default overlap


def _encode_need(model: torch.nn.Module, case: Case) -> int:
    return video_encode_need(model, case.frames, case.height, case.width, DTYPES[case.dtype], case.tile)  # type: ignore[arg-type]


OPS = {
    "decode": Op("decoder", _latents, _decode, lambda m: [m.conv2, m.decoder],
                 lambda m, c: sum(video_need(m, c.shape(), DTYPES[c.dtype], c.tile, c.order).values()),
                 lambda m, c: estimate_video(m, c.shape(), DTYPES[c.dtype], c.tile, c.order)),
    "encode": Op("encoder", _frames, _encode, lambda m: [m.encoder, m.conv1], _encode_need, _encode_need),
}  # fmt: skip


def _nbytes(x: object) -> int:
    tensors = [f.image for f in x] if isinstance(x, list) else [x]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def measure(case: Case, threads: int, plain: bool = False) -> dict[str, float]:
    """Run one case in this process; bytes grown during the run, resident before it (weights, input), and wall seconds."""
    torch.set_num_threads(threads)
    op = OPS[case.op]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vae = load_vae("wan", random_weights=True, parts=op.parts, dtype=DTYPES[case.dtype])
    if not plain:
        memory.return_freed_memory()  # as `vaetool video decode` / `encode` do where memory is short
    warm, x = op.inputs(case)
    op.run(vae, case, warm)  # warm-up: oneDNN kernels, thread pools
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    start, t0 = _status("VmRSS"), time.perf_counter()
    op.run(vae, case, x)
    wall = time.perf_counter() - t0
    weights = sum(p.numel() * p.element_size() for m in op.weights(vae.model) for p in m.parameters())
    return {"grown": _status("VmHWM") - start, "resident": weights + _nbytes(x), "wall": wall}


def main() -> None:
    """Run the cases, each in its own process, and print measured against estimated peaks."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=CASES, help="cases, or `encode` / `decode` for that op's list")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--point", help="measure one case in this process (JSON on stdout)")
    ap.add_argument("--plain-malloc", action="store_true", help="leave glibc's dynamic mmap threshold (what the CLI did before)")
    args = ap.parse_args()
    if args.point:
        print(json.dumps(measure(Case.parse(args.point), args.threads, args.plain_malloc)))
        return
    cases = [c for text in args.cases for c in LISTS.get(text, [text])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models = {(op, dt): load_vae("wan", random_weights=True, parts=OPS[op].parts, dtype=DTYPES[dt]).model
                  for op, dt in {Case.parse(c)[:5:4] for c in cases}}  # fmt: skip
    print("| op | frames | size | dtype | tile | order | wall s | measured MiB | pieces MiB | estimate MiB | estimate / measured |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for text in cases:
        case = Case.parse(text)
        cmd = [sys.executable, __file__, "--point", text, "--threads", str(args.threads)]
        cmd += ["--plain-malloc"] if args.plain_malloc else []
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        point = json.loads(done.stdout.strip().splitlines()[-1])
        measured = point["grown"] + point["resident"]
        model = models[case.op, case.dtype]
        pieces, est = OPS[case.op].pieces(model, case), OPS[case.op].estimate(model, case)
        order = case.order if case.tile and case.op == "decode" else "-"
        print(f"| {case.op} | {case.frames} | {case.height}x{case.width} | {case.dtype} | {case.tile or 'off'} | {order} "
              f"| {point['wall']:.1f} "
              f"| {measured / 2**20:.0f} | {pieces / 2**20:.0f} | {est / 2**20:.0f} | {est / measured:.3f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
