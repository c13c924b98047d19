"""Dataset encode: `vaetool encode` on a folder of photos vs a plain diffusers loop, whole processes side by side.

A folder of --images photos (JPEG and PNG, mixed sizes 256-512 px, cut from examples/images) is
encoded to one latent file per image by
  vaetool:   `python -m vaetool encode DIR -o OUT --checkpoint WEIGHTS --family sd1 --json -q`
             (its defaults: batches by size from the memory planner, 2 reader threads, fp32 on CPU)
  diffusers: this script's `--child` mode, what a typical user script does: AutoencoderKL(SD
             config) + load_state_dict of the same file, then per image: PIL open, to a tensor,
             `vae.encode(x).latent_dist.mode()` under torch.no_grad(), safetensors save_file
each a fresh process (wall time from start to exit, interpreter and model loading included; peak
RSS from os.wait4), alternating which runs first over --repeats. Prints images/s of each and the
ratio vaetool/diffusers (issue 17 target: >= 1.3), and checks that both wrote the same latents.
Both read the same diffusers-layout .safetensors (random SD-sized weights, seed 0).

    OMP_NUM_THREADS=2 python bench/bench_dataset_encode.py         # 48 photos, SD-sized VAE, 1 run of each
    python bench/bench_dataset_encode.py --smoke                   # tiny config, 4 small photos (the test)

The machine may be shared: compare the ratio of one run, not seconds across runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this tree's vaetool, not an installed one
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vs_diffusers import ROOT, SD_CONFIG, TINY_CONFIG, make_weights, run

SOURCES = sorted((ROOT / "examples" / "images").glob("*.[pj][np]g"))
SIZES = [(512, 512), (512, 384), (384, 512), (448, 320), (320, 448), (256, 256),
         (384, 384), (512, 256), (256, 384), (320, 320), (448, 448), (384, 256)]  # (w, h), all multiples of 8  # fmt: skip
CONFIGS = {"sd": SD_CONFIG, "tiny": TINY_CONFIG}
IMAGE_SUFFIXES = (".png", ".jpg")


def make_photos(folder: Path, count: int, shrink: int = 1) -> list[Path]:
    """`count` photos cycling SIZES (divided by `shrink`): an example image scaled to cover, cropped; JPEG and PNG alternately."""
    from PIL import Image

    sources = [Image.open(p).convert("RGB") for p in SOURCES]
    paths = []
    for i in range(count):
        w, h = (s // shrink for s in SIZES[i % len(SIZES)])
        src = sources[i % len(sources)]
        scale = max(w / src.width, h / src.height) * (1 + 0.1 * (i % 3))  # a different crop of the same source each time
        big = src.resize((round(src.width * scale), round(src.height * scale)), Image.BICUBIC)
        x0, y0 = (big.width - w) * (i % 5) // 4, (big.height - h) * (i % 7) // 6
        photo = big.crop((x0, y0, x0 + w, y0 + h))
        path = folder / f"photo{i:03d}{IMAGE_SUFFIXES[i % 2]}"
        photo.save(path, quality=90) if path.suffix == ".jpg" else photo.save(path)
        paths.append(path)
    return paths


def child(model: str, weights: str, folder: str, out: str) -> None:
    """The plain diffusers loop, run as its own process: one image at a time, one latent file each."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL
    from PIL import Image
    from safetensors.torch import load_file, save_file

    vae = AutoencoderKL(**CONFIGS[model])
    vae.load_state_dict(load_file(weights))
    vae.eval()
    start = time.perf_counter()
    compute = 0.0
    files = sorted(p for p in Path(folder).iterdir() if p.suffix in IMAGE_SUFFIXES)
    for path in files:
        image = np.asarray(Image.open(path).convert("RGB"))  # [H, W, 3] uint8
        x = torch.from_numpy(image).permute(2, 0, 1).float().div(127.5).sub(1.0)[None]  # [1, 3, H, W] in [-1, 1]
        t0 = time.perf_counter()
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mode()  # [1, 4, H/8, W/8]
        compute += time.perf_counter() - t0
        save_file({"latent": z[0].contiguous()}, str(Path(out) / f"{path.stem}.safetensors"))
    print(json.dumps({"images": len(files), "seconds": time.perf_counter() - start, "compute_seconds": compute}))


def compare(vaetool_out: Path, diffusers_out: Path) -> tuple[int, float, float]:
    """(latents compared, max abs difference, SNR in dB) between vaetool's and diffusers' latent of each image."""
    from safetensors.torch import load_file

    from vaetool.io.latents import load_latents

    worst, count, err, energy = 0.0, 0, 0.0, 0.0
    for path in sorted(diffusers_out.glob("*.safetensors")):
        (mine,) = sorted(vaetool_out.rglob(f"{path.stem}*.safetensors"))
        ours = load_latents(mine)[0].latent.float()
        theirs = load_file(str(path))["latent"].float()
        if ours.shape != theirs.shape:
            raise SystemExit(f"{path.stem}: vaetool latent {tuple(ours.shape)} but diffusers {tuple(theirs.shape)}")
        worst, count = max(worst, float((ours - theirs).abs().max())), count + 1
        err, energy = err + float(((ours - theirs) ** 2).sum()), energy + float((theirs**2).sum())
    return count, worst, 10 * math.log10(energy / err) if err else math.inf


def main() -> None:
    """Parse options, make the photos and the weights, run both processes, print images/s and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny config, 4 photos at a quarter of the sizes")
    parser.add_argument("--images", type=int, help="photos in the folder (default 48; smoke 4)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each tool, alternating which goes first (median)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    parser.add_argument("--json", type=Path, help="write the rows here too")
    parser.add_argument("--dtype", default="auto", help="vaetool's --dtype (auto: bf16 on a CPU with native bf16, else fp32; "
                        "the diffusers loop is fp32, as a plain script is)")
    parser.add_argument("--child", nargs=4, metavar=("MODEL", "WEIGHTS", "DIR", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    model = "tiny" if args.smoke else "sd"
    count = args.images or (4 if args.smoke else 48)
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-dataset-encode-") as tmp_name:
        tmp = Path(tmp_name)
        weights, photos = tmp / "vae.safetensors", tmp / "photos"
        photos.mkdir()
        make_weights(CONFIGS[model], weights)
        paths = make_photos(photos, count, shrink=4 if args.smoke else 1)
        megapixels = sum(w * h for w, h in (SIZES[i % len(SIZES)] for i in range(count))) / 1e6 / (16 if args.smoke else 1)
        print(f"dataset encode: {count} photos ({sum(p.suffix == '.jpg' for p in paths)} JPEG, {megapixels:.2f} MP), "
              f"{'tiny' if args.smoke else 'SD-sized'} AutoencoderKL (random weights, seed 0), {args.threads} threads, "
              f"{args.repeats} run(s) of each, whole processes", flush=True)  # fmt: skip
        for rep in range(args.repeats):
            for tool in ("vaetool", "diffusers") if rep % 2 == 0 else ("diffusers", "vaetool"):
                out = tmp / f"out-{tool}-{rep}"
                if tool == "vaetool":
                    cmd = [sys.executable, "-m", "vaetool", "encode", str(photos), "-o", str(out), "--checkpoint", str(weights),
                           "--family", "sd1", "--dtype", args.dtype, "--json", "-q"]  # fmt: skip
                else:
                    out.mkdir()
                    cmd = [sys.executable, __file__, "--child", model, str(weights), str(photos), str(out)]
                row = {"tool": tool, "repeat": rep, "images": count} | run(cmd, env, tmp / f"{tool}-{rep}.log")
                row["images_per_s"] = count / row["wall"]
                rows.append(row)
                print(f"{tool:9} #{rep}: wall {row['wall']:7.1f} s ({row['images_per_s']:.2f} images/s)  compute {row['compute']:7.1f} s  "
                      f"cpu {row['cpu']:7.1f} s  peak RSS {row['peak'] / 2**20:6.0f} MiB", flush=True)  # fmt: skip
        compared, worst, snr = compare(tmp / "out-vaetool-0", tmp / "out-diffusers-0")
    if compared != count:
        raise SystemExit(f"only {compared} of {count} latents were compared")
    med = {t: {k: statistics.median(r[k] for r in rows if r["tool"] == t) for k in ("wall", "cpu", "compute", "peak")}
           for t in ("vaetool", "diffusers")}  # fmt: skip
    ratio = med["diffusers"]["wall"] / med["vaetool"]["wall"]
    print(f"\nvaetool {count / med['vaetool']['wall']:.2f} images/s, diffusers loop {count / med['diffusers']['wall']:.2f} images/s "
          f"(whole processes, median of {args.repeats})")  # fmt: skip
    compute = med["diffusers"]["compute"] / med["vaetool"]["compute"]
    print(f"throughput ratio vaetool/diffusers: {ratio:.2f}x (target >= 1.3); model compute only: {compute:.2f}x; "
          f"peak RSS vaetool/diffusers {med['vaetool']['peak'] / med['diffusers']['peak']:.2f}x")  # fmt: skip
    print(f"CPU time (user + system) ratio diffusers/vaetool: {med['diffusers']['cpu'] / med['vaetool']['cpu']:.2f}x "
          "(less sensitive to other load on a shared machine than wall time)")
    print(f"latents: {compared} compared, max |vaetool - diffusers| {worst:.2e}, SNR {snr:.1f} dB (vaetool --dtype {args.dtype})")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "ratio": ratio, "max_abs_diff": worst, "snr_db": snr,
                                               "dtype": args.dtype}, indent=1))


if __name__ == "__main__":
    main()
