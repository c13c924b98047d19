"""Throughput of `vaetool encode` from WebDataset tar shards and from a folder, against the model alone, and the
write rate of each output format (issue 16).

Generates the images of bench_encode.py (mixed sizes around 256 px), as loose PNGs and packed into tar shards, then
  model:      Vae.moments on the engine's batches of these images, tensors preloaded (pure compute),
  folder:     `vaetool encode FOLDER` (vaetool files),
  shards:     `vaetool encode 'data-{0000..N}.tar' --format webdataset` (tar in, tar out),
and prints images/s and the ratio to the model (target >= 85 %, as for folders); then, with no model, the
rate at which each format's writer stores latents of 32 x 32 (256 px, 4 channels; 16 for musubi):
vaetool .safetensors files, webdataset tar members, sd-scripts .npz, musubi .safetensors.

    python bench/bench_webdataset.py [--model tiny-f8] [--images 64] [--shards 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_encode import encode_parser, make_images, model_seconds

from vaetool.cli import app


def pack_shards(paths: list[Path], folder: Path, shards: int) -> str:
    """Pack the images into `shards` tars (KEY.png + KEY.txt each); returns the brace spec naming them."""
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with tarfile.open(folder / f"data-{s:04d}.tar", "w") as tar:
            for path in paths[s::shards]:
                for name, data in ((f"{path.stem}.png", path.read_bytes()), (f"{path.stem}.txt", b"a caption")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / f"data-{{0000..{shards - 1:04d}}}.tar")


def command_seconds(inputs: str, out: Path, args: argparse.Namespace, *extra: str) -> float:
    """Wall seconds `vaetool encode --json` reports (after the model is loaded)."""
    cli = ["encode", inputs, "-o", str(out), "--model", args.model, "--device", args.device, "--dtype", args.dtype,
           "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--tile", "off", "--json", "--quiet",
           "--overwrite", *extra]
    result = CliRunner().invoke(app, cli)
    if result.exit_code != 0:
        raise SystemExit(f"encode failed: {result.output[-2000:]}")
    return float(json.loads(result.stdout)["seconds"])


def write_rates(tmp: Path, count: int) -> dict[str, float]:
    """Latents written per second by each format's writer (no model): files, tar members, npz, musubi."""
    from vaetool.families import get_family
    from vaetool.io.latents import latent_bytes, save_latent
    from vaetool.io.trainer_writers import TRAINER_FORMATS
    from vaetool.io.webdataset import TarWriter

    meta = {"family": "sdxl", "original_size": [256, 256], "provenance": {"config": "bench"}}
    lat4, lat16 = torch.randn(4, 32, 32), torch.randn(16, 32, 32)  # [C, h, w]
    writers = {
        "vaetool": lambda i, d: save_latent(d / f"{i}.safetensors", lat4, meta),
        "sd-scripts": lambda i, d: TRAINER_FORMATS["sd-scripts"].write(d / f"{i}_0256x0256_sdxl.npz", lat4, get_family("sdxl"),
                                                                       (256, 256), overwrite=False, provenance="{}"),
        "musubi": lambda i, d: TRAINER_FORMATS["musubi"].write(d / f"{i}_0256x0256_wan.safetensors", lat16, get_family("wan"),
                                                               (256, 256), overwrite=False, provenance="{}"),
    }
    rates = {}
    for name, write in writers.items():
        folder = tmp / f"w-{name}"
        start = time.perf_counter()
        for i in range(count):
            write(i, folder)
        rates[name] = count / (time.perf_counter() - start)
    start = time.perf_counter()
    with TarWriter(tmp / "w.tar") as tar:
        for i in range(count):
            tar.add(f"{i}.latent.safetensors", latent_bytes(lat4, meta))
            tar.add(f"{i}.json", json.dumps({"vaetool": meta}).encode())
    rates["webdataset"] = count / (time.perf_counter() - start)
    return rates


def main() -> None:
    """Run the benchmark and print images/s of the model, the folder and the shard runs, and the writers' rates."""
    parser = encode_parser(__doc__)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--writes", type=int, default=500, help="latents written per format in the writer measurement")
    args = parser.parse_args()
    runs: dict[str, list[float]] = {"model": [], "folder": [], "shards": []}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "images").mkdir()
        paths = make_images(tmp / "images", args.images)
        spec = pack_shards(paths, tmp / "shards", args.shards)
        measure = {
            "model": lambda: model_seconds(args.model, args.device, args.dtype, paths, args.batch_size, args.workers),
            "folder": lambda: command_seconds(str(tmp / "images"), tmp / "out-folder", args),
            "shards": lambda: command_seconds(spec, tmp / "out-shards", args, "--format", "webdataset"),
        }
        for i in range(args.repeats):  # rotate which runs first: a busy machine then favours none
            names = list(measure)
            for name in names[i % 3:] + names[: i % 3]:
                runs[name].append(measure[name]())
        rates = write_rates(tmp, args.writes)
    model_ips = args.images / min(runs["model"])
    print(f"images: {args.images} (around 256 px) in {args.shards} shards, model {args.model}, device {args.device}, "
          f"dtype {args.dtype}, batch {args.batch_size}, workers {args.workers}, torch threads {torch.get_num_threads()}")
    for name in runs:
        ips = args.images / min(runs[name])
        print(f"{name:>7}: {ips:8.2f} images/s  ({ips / model_ips:6.1%} of the model)   runs (s): "
              f"{', '.join(f'{t:.2f}' for t in runs[name])}")
    print(f"writers, latents/s ({args.writes} each, 32 x 32 latents, no model):")
    for name, rate in rates.items():
        print(f"  {name:>10}: {rate:9.1f}")


if __name__ == "__main__":
    main()
