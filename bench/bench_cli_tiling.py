"""Tiled vs untiled encode/decode through the CLI: whole `python -m vaetool` processes, peak RSS, time, PSNR.

    python bench/bench_cli_tiling.py                                  # SD-sized random weights, 512 px, decode and encode
    python bench/bench_cli_tiling.py --sizes 512 1024 --ops decode --threads 1
    python bench/bench_cli_tiling.py --huge-only                      # SD-sized 2048 px fast decode, --max-memory 2GiB
    python bench/bench_cli_tiling.py --model mini --sizes 1280x1024 --ops decode --cases off exact exact:256 --threads 1
    python bench/bench_cli_tiling.py --tiny                           # seconds: tiny random weights, 64 px (CI smoke test)

Each case is one `python -m vaetool encode|decode ... --json` process, run with OMP_NUM_THREADS =
--threads and waited for with os.wait4, which gives its peak RSS (ru_maxrss: the whole process,
Python, torch, weights and all) and its CPU time; "wall" is the process's wall time and "compute"
the `compute_seconds` its JSON summary reports (model calls only). The machine may be shared:
CPU time and compute time are steadier than wall time; compare ratios, not seconds. The
processes run in --root (default: this checkout) with it as PYTHONPATH (`python -m` puts the
working folder first on sys.path), so `--root OLD_CHECKOUT` measures another commit.

Weights (--model): `sd` is diffusers' AutoencoderKL with SD's config under torch.manual_seed(0)
(bench_tiling.make_weights), written to a temp .safetensors and passed as `-c sd1 --checkpoint
FILE`; `tiny` is vaetool's tiny-f8 with its seeded random weights, saved the same way (`-c
tiny-f8 --checkpoint FILE`); `mini` is the shipped default model. Input: examples/images/chelsea.png resized (bicubic) to each size; the
decode cases decode the latent of the untiled `vaetool encode` of that image, written as 16-bit
PNGs. A case is MODE[:TILE][@BUDGET], e.g. `exact:256` (--tile exact --tile-size 256) or
`fast@2GiB` (--tile fast --max-memory 2GiB, the planner picks the tile). Each case is compared
with the `off` case of its size: PSNR over the reference's value range (decode: of the 16-bit
PNGs, in [-1, 1]; encode: of the latents).

The baseline is the same command on a 64 px input (a tiny latent for decode): what the runtime
holds whatever the size (a 64 px case is its own baseline). A case with a budget passes when its peak RSS is at most the budget
plus the baseline with the same flags. --huge decodes 2048 px (the latent of the largest size,
upsampled bicubically) with `fast@2GiB`; the untiled reference would need ~16 GiB, so it has no
PSNR unless --huge-reference also runs exact mode (~7 GiB, slow).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "examples" / "images" / "chelsea.png"
BASELINE_PX = 64
HUGE_PX = 2048
HUGE_CASE = "fast@2GiB"
NET_MIN = 16 * 2**20  # bytes of growth over the baseline below which no net-peak ratio is printed


@dataclass(frozen=True)
class Model:
    """A vaetool config and where the CLI gets its weights: `random-sd` (diffusers, seed 0), `seeded` (vaetool's own) or `shipped`."""

    config: str
    weights: str


MODELS: dict[str, Model] = {
    "sd": Model("sd1", "random-sd"),  # bench_tiling.make_weights: the weights bench_tiling.py measures
    "tiny": Model("tiny-f8", "seeded"),  # the tiny config's seeded random weights, saved by vaetool: no diffusers import
    "mini": Model("mini", "shipped"),
}


@dataclass(frozen=True)
class Case:
    """One CLI configuration: --tile MODE [--tile-size TILE] [--max-memory BUDGET]."""

    mode: str
    tile: int | None = None
    budget: str | None = None

    @staticmethod
    def parse(text: str) -> Case:
        """MODE[:TILE][@BUDGET], e.g. off, exact:256, fast@2GiB."""
        head, _, budget = text.partition("@")
        mode, _, tile = head.partition(":")
        return Case(mode, int(tile) if tile else None, budget or None)

    @property
    def name(self) -> str:
        """The case as written on the command line of this script."""
        return self.mode + (f":{self.tile}" if self.tile else "") + (f"@{self.budget}" if self.budget else "")

    def flags(self) -> list[str]:
        """The CLI options of this case."""
        return ["--tile", self.mode, *(["--tile-size", str(self.tile)] if self.tile else []),
                *(["--max-memory", self.budget] if self.budget else [])]  # fmt: skip


def make_weights(model: Model, path: Path) -> list[str]:
    """Write `model`'s random weights to `path` unless they are shipped; the CLI's model options."""
    if model.weights == "shipped":
        return ["-m", model.config]
    if model.weights == "random-sd":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_tiling import make_weights as random_sd_weights

        random_sd_weights(path)
    else:
        from safetensors.torch import save_file

        from vaetool.api import load_vae

        save_file({k: v.contiguous() for k, v in load_vae(model.config).model.state_dict().items()}, str(path))
    return ["-c", model.config, "--checkpoint", str(path)]


def make_image(path: Path, width: int, height: int) -> Path:
    """The test image resized (bicubic) to width x height, as a PNG."""
    Image.open(IMAGE).convert("RGB").resize((width, height), Image.BICUBIC).save(path)
    return path


def run_baseline(args: list[str], env: dict[str, str], cwd: Path) -> dict:
    """`run_cli` of a small baseline case (the runtime and the weights), logged to CWD/base.log; exits the bench if it fails."""
    base = run_cli(args, env, cwd, 600, cwd / "base.log")
    if "error" in base:
        raise SystemExit(f"baseline: {base['error']}")
    return base


def run_cli(args: list[str], env: dict[str, str], cwd: Path, timeout: float, log: Path) -> dict:
    """Run `python -m vaetool ARGS --json` as one process: its JSON summary, peak RSS, CPU and wall time."""
    cmd = [sys.executable, "-m", "vaetool", *args, "--json"]
    with open(log, "w") as out, open(log.with_suffix(".err"), "w") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=cwd)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - t0 > timeout:
                proc.kill()
                proc.wait()
                return {"error": f"timed out after {timeout:.0f} s"}
            time.sleep(0.2)
        wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = (log.with_suffix(".err").read_text().strip().splitlines() or ["failed"])[-1]
        return {"error": f"exit {code}: {tail}"}
    summary = json.loads(log.read_text())
    if summary.get("failed"):
        return {"error": f"failed inputs: {summary['failed']}"}
    return {
        "wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "compute": float(summary.get("compute_seconds", math.nan)),
        "peak": usage.ru_maxrss * 1024,  # Linux: KiB
    }  # fmt: skip


def psnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR (dB) of `out` against `ref`, over the reference's value range."""
    mse = (out.double() - ref.double()).square().mean().item()
    rng = (ref.max() - ref.min()).item()
    return math.inf if mse == 0 else 10 * math.log10(rng * rng / mse)


def read_output(op: str, folder: Path) -> torch.Tensor:
    """The one output of a CLI run: a decoded 16-bit PNG [3, H, W] in [-1, 1], or an encoded latent [C, h, w]."""
    from vaetool.io.images import load_image
    from vaetool.io.latents import load_latents

    suffix = ".png" if op == "decode" else ".safetensors"
    files = sorted(folder.rglob(f"*{suffix}"))
    if len(files) != 1:
        raise RuntimeError(f"expected one {suffix} output in {folder}, found {len(files)}")
    return load_image(files[0]) if op == "decode" else load_latents(files[0])[0].latent


class Bench:
    """Runs cases as CLI processes in a temp folder and keeps their rows."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="bench_cli_tiling_"))
        self.env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(args.root.resolve())}
        self.model_args = make_weights(MODELS[args.model], self.tmp / "weights.safetensors")
        self.rows: list[dict] = []
        self.baselines: dict[tuple[str, str], dict] = {}
        self.latents: dict[Path, Path] = {}
        self._count = 0

    def run(self, op: str, source: Path, case: Case, extra: list[str] | None = None) -> tuple[dict, Path]:
        """One CLI run of `op` on `source` with `case`'s flags: (measurements, output folder)."""
        self._count += 1
        out = self.tmp / f"out{self._count}"
        args = [op, str(source), "-o", str(out), *self.model_args, *case.flags(), *(extra or []), "--device", "cpu"]
        if op == "decode":
            args.append("--16bit")
        return run_cli(args, self.env, self.args.root.resolve(), self.args.timeout, self.tmp / f"run{self._count}.json"), out

    def encode_latent(self, image: Path) -> Path:
        """The untiled latent file of `image` (vaetool's own .safetensors with its metadata), encoded once."""
        if image not in self.latents:
            r, out = self.run("encode", image, Case("off"))
            if "error" in r:
                sys.exit(f"bench_cli_tiling: the reference encode of {image.name} failed: {r['error']}")
            self.latents[image] = next(out.rglob("*.safetensors"))
        return self.latents[image]

    def baseline(self, op: str, case: Case) -> dict:
        """The same command on a 64 px input (decode: its 8 x 8 latent): what the process holds at any size."""
        key = (op, case.name if case.budget else "off")
        if key not in self.baselines:
            image = self.tmp / f"image{BASELINE_PX}.png"
            if not image.exists():
                make_image(image, BASELINE_PX, BASELINE_PX)
            source = image if op == "encode" else self.encode_latent(image)
            r, _ = self.run(op, source, case if case.budget else Case("off"))
            if "error" in r:
                sys.exit(f"bench_cli_tiling: the {op} baseline failed: {r['error']}")
            self.baselines[key] = r
            self.rows.append({"op": op, "size": f"{BASELINE_PX}", "case": f"baseline ({key[1]})", **r})
            print(fmt(self.rows[-1]), flush=True)
        return self.baselines[key]

    def size(self, width: int, height: int, ops: list[str], cases: list[Case]) -> Path:
        """Every case of every op at one size against its `off` case; returns the latent file (for --huge)."""
        label = f"{width}" if width == height else f"{width}x{height}"
        image = make_image(self.tmp / f"image{label}.png", width, height)
        latent = self.encode_latent(image)
        for op in ops:
            source = image if op == "encode" else latent
            ref = None
            for case in [Case("off"), *[c for c in cases if c != Case("off")]]:
                own = (width, height) == (BASELINE_PX, BASELINE_PX)  # a 64 px case is its own baseline
                base = None if own else self.baseline(op, case)
                r, out = self.run(op, source, case)
                row = {"op": op, "size": label, "case": case.name, **r, "base_peak": (base or r).get("peak")}
                if "error" not in r:
                    y = read_output(op, out)
                    if case == Case("off"):
                        ref = y
                        row["clipped"] = float((y.abs() >= 1.0).float().mean()) if op == "decode" else None
                    elif ref is not None:
                        row["psnr"], row["maxabs"] = psnr(y, ref), (y - ref).abs().max().item()
                    self.check_budget(row, case)
                self.rows.append(row)
                print(fmt(row), flush=True)
        return latent

    def check_budget(self, row: dict, case: Case) -> None:
        """A budget case: whether the process's peak stayed within the budget plus the baseline with the same flags."""
        if case.budget is None:
            return
        from vaetool.memory import parse_memory

        row["budget"] = parse_memory(case.budget)
        row["within"] = row["peak"] <= row["budget"] + row["base_peak"]

    def huge(self, latent: Path, reference: bool) -> None:
        """Decode HUGE_PX px (the latent upsampled) with HUGE_CASE; with `reference`, also exact mode for the PSNR."""
        from vaetool.io.latents import load_latents

        z = load_latents(latent)[0].latent[None]  # [1, C, h, w]
        scale = HUGE_PX // (z.shape[3] * 8)
        z = torch.nn.functional.interpolate(z, scale_factor=float(scale), mode="bicubic")  # [1, C, 256, 256]
        source = self.tmp / f"latent{HUGE_PX}.npy"
        np.save(source, z.contiguous().numpy())  # no metadata: raw, no crop
        ref = None
        for case in [*([Case("exact")] if reference else []), Case.parse(HUGE_CASE)]:
            base = self.baseline("decode", case)
            r, out = self.run("decode", source, case)
            row = {"op": "decode", "size": f"{HUGE_PX}", "case": case.name, **r, "base_peak": base["peak"]}
            if "error" not in r:
                y = read_output("decode", out)
                if ref is None and case.mode == "exact":
                    ref = y
                elif ref is not None:
                    row["psnr"], row["maxabs"] = psnr(y, ref), (y - ref).abs().max().item()
                self.check_budget(row, case)
            self.rows.append(row)
            print(fmt(row), flush=True)


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f}"


def fmt(row: dict) -> str:
    """One table row."""
    head = f"| {row['op']} | {row['size']} | {row['case']} |"
    if "error" in row:
        return f"{head} failed: {row['error']} | | | | | |"
    p = row.get("psnr")
    ptxt = "-" if p is None else ("inf" if p == math.inf else f"{p:.1f}")
    net = "-" if "base_peak" not in row else _mib(row["peak"] - row["base_peak"])
    return f"{head} {row['wall']:.1f} | {row['cpu']:.1f} | {row['compute']:.1f} | {_mib(row['peak'])} | {net} | {ptxt} |"


def report(rows: list[dict]) -> None:
    """The table, the ratios against untiled, and the budget checks."""
    print("\n| op | px | case | wall s | cpu s | compute s | peak RSS MiB | peak - baseline MiB | PSNR dB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(fmt(row))
    ok = {(r["op"], r["size"], r["case"]): r for r in rows if "error" not in r}
    print("\nratios against untiled (off) of the same size: time (wall, cpu, compute), peak RSS (whole, minus baseline)")
    for (op, size, case), r in ok.items():
        ref = ok.get((op, size, "off"))
        if case == "off" or case.startswith("baseline") or ref is None:
            continue
        t = ", ".join(f"{r[k] / ref[k]:.2f}" for k in ("wall", "cpu", "compute"))
        grown = ref["peak"] - ref["base_peak"]  # below NET_MIN the growth is noise, not a ratio's denominator
        net = f"{(r['peak'] - r['base_peak']) / grown:.2f}" if grown >= NET_MIN else "-"
        peak = f"{r['peak'] / ref['peak']:.2f}, {net}"
        print(f"  {op} {size} {case}: time {t}; peak {peak}")
    for r in rows:
        if "budget" in r:
            verdict = "within" if r["within"] else "OVER"
            print(f"  {r['op']} {r['size']} {r['case']}: peak RSS {_mib(r['peak'])} MiB <= budget {_mib(r['budget'])} + baseline "
                  f"{_mib(r['base_peak'])} MiB: {verdict} (peak - baseline = {(r['peak'] - r['base_peak']) / r['budget']:.2f} x budget)")


def _size(text: str) -> tuple[int, int]:
    w, _, h = text.partition("x")
    return int(w), int(h or w)


def main() -> None:
    """Run the benchmark and print the table and ratios."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="sd", help="sd: SD-sized random weights; mini: the shipped model")
    ap.add_argument("--sizes", type=_size, nargs="+", default=[(512, 512)], help="image sizes: 512 or WIDTHxHEIGHT")
    ap.add_argument("--ops", nargs="+", default=["decode", "encode"], choices=["decode", "encode"])
    ap.add_argument("--cases", type=Case.parse, nargs="+", default=[Case("off"), Case("exact", 256), Case("fast", 256)],
                    help="MODE[:TILE][@BUDGET], e.g. exact:256 fast@2GiB (off is always run)")
    ap.add_argument("--huge", action="store_true", help=f"also decode {HUGE_PX} px with {HUGE_CASE} (the budget check)")
    ap.add_argument("--huge-only", action="store_true", help="only the --huge case (after one small encode for its latent)")
    ap.add_argument("--huge-reference", action="store_true", help="with --huge: also decode it in exact mode, for the PSNR")
    ap.add_argument("--tiny", action="store_true", help="seconds: tiny weights, 64 px, decode off and fast:32@1GiB")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per process")
    ap.add_argument("--root", type=Path, default=ROOT, help="vaetool checkout the processes run (PYTHONPATH)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (weights, inputs, outputs, logs)")
    args = ap.parse_args()
    if args.tiny:
        args.model, args.sizes, args.ops = "tiny", [(64, 64)], ["decode"]
        args.cases = [Case("off"), Case("fast", 32, "1GiB")]
    bench = Bench(args)
    try:
        latent = None
        for width, height in [(512, 512)] if args.huge_only else args.sizes:
            latent = bench.size(width, height, [] if args.huge_only else args.ops, args.cases)
        if (args.huge or args.huge_only) and latent is not None:
            bench.huge(latent, args.huge_reference)
    finally:
        if not args.keep:
            shutil.rmtree(bench.tmp, ignore_errors=True)
    report(bench.rows)
    if args.json:
        args.json.write_text(json.dumps(bench.rows, indent=1, default=str))


if __name__ == "__main__":
    main()
