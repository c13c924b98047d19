"""A Wan 2.1 image decode through the CLI within a budget: `vaetool decode -c wan --random-weights` on a random latent.

    python bench/bench_wan_image.py                                   # 128 x 128 latent (1024 px): off, 4GiB, 1.5GiB, 1GiB
    python bench/bench_wan_image.py --latent 64 --budgets 512MiB --threads 1

Each case is one `python -m vaetool decode LATENT.npy -o DIR -c wan --random-weights --raw --16bit
--json` process (bench_cli_tiling.run_cli: peak RSS and CPU time from os.wait4, the summary's
compute_seconds): `off` is `--tile off`, a budget is `--tile auto --max-memory BUDGET`. The latent is
standard normal (seed 0), [1, 16, N, N]. The baseline is the same command on an 8 x 8 latent: the
runtime and the weights. A budget passes when the peak RSS is at most the budget plus the
baseline. "planner" is what `tiling.choose` picks for that budget; PSNR is over the 16-bit PNGs,
against `off`. The machine may be shared: compare CPU and compute times, not wall times.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cli_tiling import ROOT, psnr, read_output, run_baseline, run_cli

from vaetool import memory
from vaetool.api import load_vae
from vaetool.tiling import Tiling, choose


def planner(model: torch.nn.Module, budget: str, px: int) -> str:
    """What the front door runs for one px x px decode within `budget`."""
    choice = choose(model, "decode", 1, px, px, Tiling("auto", max_memory=budget))
    return choice.mode if choice.tile_size is None else f"{choice.mode} {choice.tile_size}"


def main() -> None:
    """Run the cases and print a table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latent", type=int, default=128, help="latent edge (the image is 8x)")
    ap.add_argument("--budgets", nargs="+", default=["4GiB", "1.5GiB", "1GiB"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1800)
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    px = args.latent * 8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_vae("wan", random_weights=True).model  # for the planner's choice only
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, n in (("z", args.latent), ("z8", 8)):
            np.save(work / f"{name}.npy", np.random.default_rng(0).standard_normal((1, 16, n, n)).astype("float32"))
        common = ["-c", "wan", "--random-weights", "--raw", "--16bit"]
        base = run_baseline(["decode", str(work / "z8.npy"), "-o", str(work / "base"), *common, "--tile", "off"], env, work)
        print(f"baseline (8 x 8 latent): peak {base['peak'] / 2**20:.0f} MiB, cpu {base['cpu']:.1f} s", flush=True)
        print("| case | planner | wall s | cpu s | compute s | peak RSS MiB | peak - baseline MiB | within budget | PSNR dB |")
        print("|---|---|---|---|---|---|---|---|---|")
        ref = None
        for case in ["off", *args.budgets]:
            flags = ["--tile", "off"] if case == "off" else ["--tile", "auto", "--max-memory", case]
            out = work / case.replace(".", "_")
            row = run_cli(["decode", str(work / "z.npy"), "-o", str(out), *common, *flags], env, work, args.timeout,
                          work / f"{out.name}.log")  # fmt: skip
            if "error" in row:
                print(f"| {case} | | {row['error']} |", flush=True)
                continue
            image = read_output("decode", out)
            ref = image if ref is None else ref
            db = "reference" if case == "off" else f"{psnr(image, ref):.1f}"
            within = "" if case == "off" else str(row["peak"] <= memory.parse_memory(case) + base["peak"])
            plan = "off" if case == "off" else planner(model, case, px)
            print(f"| {case} | {plan} | {row['wall']:.1f} | {row['cpu']:.1f} | {row['compute']:.1f} | {row['peak'] / 2**20:.0f} "
                  f"| {(row['peak'] - base['peak']) / 2**20:.0f} | {within} | {db} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
