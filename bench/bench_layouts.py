"""One coder's forward in-process under the CPU layout levers: plain layout, NHWC unbanded, NHWC row-banded (the default).

Each variant runs in its own process (fresh allocator, fresh peak RSS): SD-sized random weights,
one warm-up, then the mean of --repeats forwards per shape; prints wall, system time, minor page
faults and the process's peak RSS. Issue 17's lever measurements in docs/speed.md come from here.

    OMP_NUM_THREADS=2 python bench/bench_layouts.py --op encode --dtype fp32
    OMP_NUM_THREADS=2 python bench/bench_layouts.py --op decode --variants nhwc-unbanded nhwc-banded
    OMP_NUM_THREADS=2 python bench/bench_layouts.py --op encode --malloc keep    # glibc keeps freed memory (dropped lever)
    THP_MEM_ALLOC_ENABLE=1 python bench/bench_layouts.py --op encode             # transparent huge pages (dropped lever)
    python bench/bench_layouts.py --smoke                                         # tiny config (the test)
"""

from __future__ import annotations

import argparse
import ctypes
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this tree's vaetool, not an installed one

VARIANTS = ("plain-layout", "nhwc-unbanded", "nhwc-banded")
SHAPES = ((1, 512, 512), (2, 384, 512), (4, 256, 256))  # (batch, height, width) of the images


def child(variant: str, op: str, dtype_name: str, config: str, shapes: list[tuple[int, int, int]], repeats: int, malloc: str) -> None:
    """One variant in this process: print one row per shape."""
    import torch

    from vaetool.api import load_vae
    from vaetool.nn import banded

    if malloc == "keep":  # freed blocks stay in glibc's heap: no page faults, but fragmentation raises the peak
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, (1 << 31) - 1)  # M_TRIM_THRESHOLD
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    vae = load_vae(config, random_weights=True, parts=f"{op}r", dtype=dtype)
    if variant == "plain-layout":
        for conv in vae.model.modules():
            if isinstance(conv, torch.nn.Conv2d) and conv.weight.device.type != "meta":
                conv.weight.data = conv.weight.data.contiguous()
    if variant == "nhwc-unbanded":
        banded.DEVICES = frozenset()
    f, channels = vae.downscale, vae.latent_format.channels
    gen = torch.Generator().manual_seed(0)
    for b, h, w in shapes:
        if op == "encode":
            x = (torch.rand(b, 3, h, w, generator=gen) * 2 - 1).to(dtype)  # [B, 3, H, W]
        else:
            x = torch.randn(b, channels, h // f, w // f, generator=gen).to(dtype)  # [B, C, H/f, W/f]
        forward = getattr(vae, op)
        with torch.no_grad():
            forward(x)
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            for _ in range(repeats):
                forward(x)
            r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        print(f"| {variant} | {b} x {h} x {w} | {(t1 - t0) / repeats:.2f} | {(r1.ru_stime - r0.ru_stime) / repeats:.2f} "
              f"| {(r1.ru_minflt - r0.ru_minflt) // repeats} | {r1.ru_maxrss // 1024} |", flush=True)


def main() -> None:
    """Parse arguments; run each variant in a child process and print one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", choices=["encode", "decode"], default="encode")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--config", default="sd1")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--malloc", choices=["default", "keep"], default="default")
    parser.add_argument("--smoke", action="store_true", help="tiny-f8 at 64 px, one repeat")
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "SHAPES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    shapes = [(2, 64, 48), (1, 64, 64)] if args.smoke else list(SHAPES)
    config, repeats = ("tiny-f8", 1) if args.smoke else (args.config, args.repeats)
    if args.child:
        parsed = [tuple(int(v) for v in s.split("x")) for s in args.child[1].split(",")]
        child(args.child[0], args.op, args.dtype, config, parsed, repeats, args.malloc)  # type: ignore[arg-type]
        return
    print(f"{args.op} {args.dtype}, {config}, malloc {args.malloc}, mean of {repeats} after a warm-up, one process per variant")
    print("| variant | images | wall s | system s | minor faults | peak RSS MiB |\n|---|---|---|---|---|---|", flush=True)
    spec = ",".join("x".join(map(str, s)) for s in shapes)
    for variant in args.variants:
        cmd = [sys.executable, __file__, "--child", variant, spec, "--op", args.op, "--dtype", args.dtype,
               "--config", args.config, "--repeats", str(args.repeats), "--malloc", args.malloc, *(["--smoke"] if args.smoke else [])]
        subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
