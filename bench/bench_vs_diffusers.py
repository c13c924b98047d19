"""vaetool decode vs diffusers, whole processes side by side: time, peak RSS, and bf16 against fp32.

One latent (the `vaetool encode` of examples' chelsea.png at --size px) is decoded by
  vaetool:   `python -m vaetool decode LATENT -o OUT --checkpoint WEIGHTS --family sd1 --dtype D --json`
  diffusers: this script's `--child` mode: AutoencoderKL(SD config), load_state_dict of the same
             file, `vae.decode(z).sample` under `torch.autocast` for bf16 (diffusers' usual way on a
             CPU: its weights stay fp32) or in fp32, then the same 16-bit PNG write
each a fresh process waited for with os.wait4 (peak RSS: ru_maxrss, the whole process; CPU time:
user + system), alternating which runs first, --repeats times; medians are printed as
vaetool/diffusers ratios (below 1: vaetool is better). Both read the same diffusers-layout
.safetensors (random SD-sized weights, diffusers' AutoencoderKL under torch.manual_seed(0); vaetool
reads diffusers keys). bf16 outputs are compared with vaetool's fp32 output (PSNR over [-1, 1]).

    python bench/bench_vs_diffusers.py                       # 512 px, fp32 and bf16, 3 repeats (~15 min, 2 cores)
    python bench/bench_vs_diffusers.py --size 64 --repeats 1 --model tiny   # smoke test (~20 s)

The machine may be shared: compare the ratios of one run, not seconds across runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGE = ROOT / "examples" / "images" / "chelsea.png"
SD_CONFIG = {  # diffusers' AutoencoderKL as in SD 1.x
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
}  # fmt: skip
TINY_CONFIG = SD_CONFIG | {"block_out_channels": [32, 32, 64, 64], "layers_per_block": 1}
CONFIGS = {"sd": ("sd1", SD_CONFIG), "tiny": ("sd1", TINY_CONFIG)}  # --model -> (family, diffusers config)
DTYPES = ("fp32", "bf16")


def make_weights(config: dict, path: Path) -> None:
    """diffusers' AutoencoderKL with `config` under torch.manual_seed(0), saved in diffusers' layout."""
    import torch
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = AutoencoderKL(**config)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def child(config_name: str, weights: str, latent: str, out: str, dtype: str) -> None:
    """The diffusers side, run in its own process: load, decode, write a 16-bit PNG like vaetool's."""
    import torch
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    from vaetool.io.images import save_png
    from vaetool.io.latents import load_latents

    t0 = time.perf_counter()
    vae = AutoencoderKL(**CONFIGS[config_name][1])
    vae.load_state_dict(load_file(weights))
    vae.eval().requires_grad_(False)
    item = load_latents(Path(latent))[0]
    z = item.latent[None].float()  # [1, 4, h, w], raw
    t1 = time.perf_counter()
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=dtype == "bf16"):
        image = vae.decode(z).sample.float().clamp(-1, 1)  # [1, 3, H, W]
    t2 = time.perf_counter()
    save_png(Path(out) / "image.png", image[0], bits=16)
    print(json.dumps({"compute_seconds": t2 - t1, "load_seconds": t1 - t0}))


def run(cmd: list[str], env: dict[str, str], log: Path) -> dict:
    """Run one process; wall, CPU time and peak RSS from os.wait4; its JSON summary (stdout)."""
    with log.open("w") as out, log.with_suffix(".err").open("w") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{log.with_suffix('.err').read_text()[-2000:]}")
    summary = json.loads(log.read_text())
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "peak": usage.ru_maxrss * 1024,
            "compute": float(summary.get("compute_seconds", math.nan))}  # fmt: skip


def read_png(folder: Path):
    """The one PNG vaetool or the child wrote in `folder`, [3, H, W] in [-1, 1]."""
    from vaetool.io.images import load_image

    (png,) = sorted(folder.rglob("*.png"))
    return load_image(png)


def psnr(a, b) -> float:
    """PSNR over the [-1, 1] range."""
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)


def main() -> None:
    """Parse options, prepare weights and a latent, run the processes, print medians and ratios."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(CONFIGS), default="sd")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="Write the rows here too.")
    parser.add_argument("--child", nargs=5, metavar=("MODEL", "WEIGHTS", "LATENT", "OUT", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    from PIL import Image

    env = os.environ | {"OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    family = CONFIGS[args.model][0]
    with tempfile.TemporaryDirectory(prefix="bench-vs-diffusers-") as tmp_name:
        tmp = Path(tmp_name)
        weights = tmp / "vae.safetensors"
        make_weights(CONFIGS[args.model][1], weights)
        Image.open(IMAGE).convert("RGB").resize((args.size, args.size), Image.BICUBIC).save(tmp / "in.png")
        model_args = ["--checkpoint", str(weights), "--family", family]
        run([sys.executable, "-m", "vaetool", "encode", str(tmp / "in.png"), "-o", str(tmp / "lat"), *model_args, "--json", "-q"],
            env, tmp / "encode.log")
        (latent,) = sorted((tmp / "lat").rglob("*.safetensors"))
        rows: list[dict] = []
        outputs: dict[tuple[str, str], object] = {}
        for rep in range(args.repeats):
            for dtype in args.dtypes:
                order = ("vaetool", "diffusers") if rep % 2 == 0 else ("diffusers", "vaetool")
                for tool in order:
                    out = tmp / f"out-{tool}-{dtype}-{rep}"
                    if tool == "vaetool":
                        cmd = [sys.executable, "-m", "vaetool", "decode", str(latent), "-o", str(out), *model_args,
                               "--dtype", dtype, "--16bit", "--json", "-q"]  # fmt: skip
                    else:
                        out.mkdir()
                        cmd = [sys.executable, __file__, "--child", args.model, str(weights), str(latent), str(out), dtype]
                    row = {"tool": tool, "dtype": dtype, "repeat": rep} | run(cmd, env, tmp / f"{tool}-{dtype}-{rep}.log")
                    rows.append(row)
                    outputs[(tool, dtype)] = read_png(out)
                    print(f"{tool:9} {dtype} #{rep}: wall {row['wall']:6.1f} s  cpu {row['cpu']:6.1f} s  "
                          f"compute {row['compute']:6.1f} s  peak {row['peak'] / 2**20:6.0f} MiB", flush=True)
    report(rows, outputs, args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


def report(rows: list[dict], outputs: dict, args: argparse.Namespace) -> None:
    """Medians per tool and dtype, the vaetool/diffusers ratios, and bf16 against vaetool's fp32."""
    print(f"\n{args.model} decode {args.size} px, {args.threads} threads, median of {args.repeats}; ratio = vaetool / diffusers")
    for dtype in args.dtypes:
        med = {t: {k: statistics.median(r[k] for r in rows if r["tool"] == t and r["dtype"] == dtype)
                   for k in ("wall", "cpu", "compute", "peak")} for t in ("vaetool", "diffusers")}  # fmt: skip
        ratio = {k: med["vaetool"][k] / med["diffusers"][k] for k in med["vaetool"]}
        print(f"{dtype}: time (wall) {ratio['wall']:.2f}  cpu {ratio['cpu']:.2f}  compute {ratio['compute']:.2f}  "
              f"peak RSS {ratio['peak']:.2f} ({med['vaetool']['peak'] / 2**20:.0f} vs {med['diffusers']['peak'] / 2**20:.0f} MiB)")
    if ("vaetool", "fp32") in outputs:
        ref = outputs[("vaetool", "fp32")]
        for (tool, dtype), image in sorted(outputs.items()):
            if (tool, dtype) != ("vaetool", "fp32"):
                print(f"PSNR vs vaetool fp32: {tool} {dtype} {psnr(image, ref):.1f} dB")


if __name__ == "__main__":
    main()
