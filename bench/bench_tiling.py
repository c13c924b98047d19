"""Tiled vs untiled encode/decode, vaetool vs diffusers, on the same random SD-sized weights (CPU).

    python bench/bench_tiling.py                      # 256 and 512 px, decode and encode
    python bench/bench_tiling.py --full               # 256, 512 and 1024 px (slow on a 2-core CPU)
    python bench/bench_tiling.py --sizes 512 --ops decode --tile 256
    python bench/bench_tiling.py --huge               # also 2048 px decode: fast within 2 GiB, exact's peak
    python bench/bench_tiling.py --sizes 256 --repeats 3   # fastest time / smallest peak of 3 runs per case

Weights: diffusers' AutoencoderKL built with SD's config (block_out_channels 128/256/512/512, two
layers per block; diffusers' own default config is a one-level toy) under torch.manual_seed(0),
saved once as safetensors; vaetool loads the same file through its diffusers->original keymap.
Input: examples/images/chelsea.png resized (bicubic) to the size; decode cases decode the latent
(posterior mean) of vaetool's untiled encode of that image. The reference for the error columns
is vaetool's untiled output; PSNR is over the reference's value range.

Every case runs in a fresh subprocess: load the weights, warm up at 64 px, then
vaetool.memory.measure_peak (Linux peak RSS, reset through /proc/self/clear_refs) of one run:
"peak MiB" is the RSS growth during the run above the loaded model and its input. Time is the
wall time of that run (the machine is shared: compare ratios, not absolute times).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "examples" / "images" / "chelsea.png"
SD_CONFIG = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
    layers_per_block=2, latent_channels=4, sample_size=512, norm_num_groups=32,
)  # fmt: skip
METHODS: tuple[str, ...] = ("vaetool", "diffusers", "exact", "fast", "diffusers-tiled")


def make_weights(path: Path) -> None:
    """Random SD-sized diffusers AutoencoderKL weights (seed 0) as safetensors."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = AutoencoderKL(**SD_CONFIG)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def make_image(size: int) -> torch.Tensor:
    """The test image at size x size, [1, 3, S, S] in [-1, 1]."""
    img = Image.open(IMAGE).convert("RGB").resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 127.5 - 1.0


def _load(method: str, weights: Path) -> tuple[object, object]:
    """(model, run-function factory) for a method."""
    if method.startswith("diffusers"):
        from diffusers import AutoencoderKL
        from safetensors.torch import load_file

        model = AutoencoderKL(**SD_CONFIG)
        model.load_state_dict(load_file(str(weights)))
        return model.eval().requires_grad_(False), None
    from vaetool.api import load_vae

    return load_vae("sd1", checkpoint=weights).model, None


def _runner(method: str, model: object, op: str, tile: int, budget: str | None) -> object:
    """A function of the input tensor running `op` with `method`."""
    from vaetool import tiling

    if method == "diffusers":
        return (lambda x: model.encode(x).latent_dist.parameters) if op == "encode" else (lambda z: model.decode(z).sample)
    if method == "diffusers-tiled":
        model.enable_tiling()
        model.tile_sample_min_size = tile
        model.tile_latent_min_size = tile // 8
        return (lambda x: model.encode(x).latent_dist.parameters) if op == "encode" else (lambda z: model.decode(z).sample)
    mode = {"vaetool": "off", "exact": "exact", "fast": "fast"}[method]
    fn = getattr(tiling, op)
    if budget is not None:
        return lambda t: fn(model, t, tiling.Tiling(mode, max_memory=budget))
    return lambda t: fn(model, t, tiling.Tiling(mode, tile_size=None if mode == "off" else tile))


def worker(spec: dict) -> None:
    """Run one case (in this fresh process) and print its JSON result line."""
    from vaetool.memory import measure_peak

    torch.set_num_threads(spec["threads"])
    model, _ = _load(spec["method"], Path(spec["weights"]))
    run = _runner(spec["method"], model, spec["op"], spec["tile"], spec.get("budget"))
    data = torch.load(spec["input"], weights_only=True)
    with torch.inference_mode():
        warm = data[:, :, : max(8, data.shape[2] // 16), : max(8, data.shape[3] // 16)]
        run(warm)
        box: dict[str, torch.Tensor] = {}

        def once() -> None:
            box["out"] = run(data)

        t0 = time.perf_counter()
        peak = measure_peak(once)
        seconds = time.perf_counter() - t0
    torch.save(box["out"].contiguous(), spec["output"])
    print(json.dumps({"seconds": seconds, "peak": peak}))


def _case(spec: dict, timeout: int, repeats: int = 1) -> dict:
    """Run one case `repeats` times, each in a fresh process: the fastest time and the smallest peak."""
    runs = []
    for _ in range(repeats):
        cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False)
        if res.returncode != 0:
            return {"error": (res.stderr.strip().splitlines() or ["failed"])[-1]}
        runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return {"seconds": min(r["seconds"] for r in runs), "peak": min(r["peak"] for r in runs)}


def errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(PSNR dB over the reference's range, max abs diff)."""
    diff = (out.double() - ref.double())
    mse = diff.square().mean().item()
    rng = (ref.max() - ref.min()).item()
    return (math.inf if mse == 0 else 10 * math.log10(rng * rng / mse)), diff.abs().max().item()


def main() -> None:
    """Run the benchmark and print the table and ratios."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--full", action="store_true", help="sizes 256, 512 and 1024")
    ap.add_argument("--huge", action="store_true", help="also decode 2048 px: fast within 2 GiB, exact's peak (those of --methods)")
    ap.add_argument("--ops", nargs="+", default=["decode", "encode"], choices=["decode", "encode"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--tile", type=int, default=256, help="tile edge in image pixels (all tiled methods)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per case")
    ap.add_argument("--repeats", type=int, default=1, help="runs per case (fresh processes): fastest time, smallest peak")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    sizes = [256, 512, 1024] if args.full else args.sizes
    tmp = Path(tempfile.mkdtemp(prefix="bench_tiling_"))
    weights = tmp / "sd.safetensors"
    make_weights(weights)
    rows: list[dict] = []
    base = {"weights": str(weights), "threads": args.threads, "tile": args.tile}
    for size in sizes:
        torch.save(make_image(size), tmp / f"image{size}.pt")
        # the latent: vaetool's untiled encode (also the encode reference)
        ref_enc = tmp / f"ref-encode{size}.pt"
        r = _case({**base, "method": "vaetool", "op": "encode", "input": str(tmp / f"image{size}.pt"),
                   "output": str(ref_enc)}, args.timeout)  # fmt: skip
        if "error" in r:
            sys.exit(f"bench_tiling: the reference encode at {size} px failed: {r['error']}")
        if "encode" in args.ops:
            rows.append({"op": "encode", "size": size, "method": "vaetool", **r, "psnr": math.inf, "maxabs": 0.0})
        torch.save(torch.load(ref_enc)[:, :4].contiguous(), tmp / f"latent{size}.pt")
        for op in args.ops:
            src = tmp / (f"image{size}.pt" if op == "encode" else f"latent{size}.pt")
            ref = ref_enc if op == "encode" else tmp / f"ref-decode{size}.pt"
            for method in args.methods:
                if op == "encode" and method == "vaetool":
                    continue
                out = ref if method == "vaetool" else tmp / f"{op}{size}-{method}.pt"
                r = _case({**base, "method": method, "op": op, "input": str(src), "output": str(out)}, args.timeout, args.repeats)
                row = {"op": op, "size": size, "method": method, **r}
                if "error" not in r:
                    row["psnr"], row["maxabs"] = errors(torch.load(out), torch.load(ref))
                rows.append(row)
                print(_fmt(row), flush=True)
    if args.huge:
        rows += _huge(base, tmp, args.timeout, args.methods)
    _report(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))


def _huge(base: dict, tmp: Path, timeout: int, methods: list[str]) -> list[dict]:
    """2048 px decode of the 1024 px latent upsampled x2: exact (the reference) and fast within 2 GiB, those in `methods`."""
    if not (tmp / "latent1024.pt").exists():
        torch.save(make_image(1024), tmp / "image1024.pt")
        _case({**base, "method": "fast", "op": "encode", "input": str(tmp / "image1024.pt"),
               "output": str(tmp / "enc1024.pt")}, timeout)  # fmt: skip
        torch.save(torch.load(tmp / "enc1024.pt")[:, :4].contiguous(), tmp / "latent1024.pt")
    z = torch.nn.functional.interpolate(torch.load(tmp / "latent1024.pt"), scale_factor=2.0, mode="bicubic")
    torch.save(z.contiguous(), tmp / "latent2048.pt")
    rows = []
    for method, budget in [(m, b) for m, b in (("exact", None), ("fast", "2GiB")) if m in methods]:
        out = tmp / f"decode2048-{method}.pt"
        spec = {**base, "tile": 512, "method": method, "op": "decode", "input": str(tmp / "latent2048.pt"),
                "output": str(out), "budget": budget}  # fmt: skip
        row = {"op": "decode", "size": 2048, "method": method + (f" ({budget})" if budget else ""), **_case(spec, timeout)}
        if "error" not in row and method == "fast" and (tmp / "decode2048-exact.pt").exists():
            row["psnr"], row["maxabs"] = errors(torch.load(out), torch.load(tmp / "decode2048-exact.pt"))
        rows.append(row)
        print(_fmt(row), flush=True)
    return rows


def _fmt(row: dict) -> str:
    if "error" in row:
        return f"| {row['op']} | {row['size']} | {row['method']} | failed: {row['error']} | | | |"
    psnr = row.get("psnr")
    ptxt = "-" if psnr is None else ("inf" if psnr == math.inf else f"{psnr:.1f}")
    mtxt = "-" if row.get("maxabs") is None else f"{row['maxabs']:.2e}"
    return f"| {row['op']} | {row['size']} | {row['method']} | {row['seconds']:.1f} | {row['peak'] / 2**20:.0f} | {ptxt} | {mtxt} |"


def _report(rows: list[dict]) -> None:
    print("\n| op | px | method | time s | peak MiB | PSNR dB | max abs |\n|---|---|---|---|---|---|---|")
    for row in rows:
        print(_fmt(row))
    ok = {(r["op"], r["size"], r["method"]): r for r in rows if "error" not in r}
    print("\nratios (time, peak):")
    for (op, size, method), r in sorted(ok.items()):
        base = ok.get((op, size, "vaetool"))
        ref = ok.get((op, size, "diffusers"))
        parts = []
        if method == "vaetool" and ref:
            parts.append(f"vaetool/diffusers untiled time {r['seconds'] / ref['seconds']:.2f}, peak {r['peak'] / ref['peak']:.2f}")
        if method in ("exact", "fast", "diffusers-tiled") and base:
            parts.append(f"{method}/untiled time {r['seconds'] / base['seconds']:.2f}, peak {r['peak'] / base['peak']:.2f}")
        if parts:
            print(f"  {op} {size}: " + "; ".join(parts))


if __name__ == "__main__":
    main()
