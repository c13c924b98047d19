"""Throughput of `vaetool encode` on a folder vs the model's own throughput on the same batches.

Generates a folder of 64 PNGs of mixed sizes around 256 px, then measures
  command: `vaetool encode` run in-process through the CLI (file decoding, padding, batching,
           compute, atomic writes, manifest); its own timer starts after the model is loaded, so
           interpreter and model start-up are left out,
  model:   Vae.moments on the same batches (the engine's own batching of these sizes, replayed)
           with the images already decoded into tensors: pure compute,
and prints images/s of each and command/model (target: >= 0.85, the I/O hidden behind compute).

    python bench/bench_encode.py [--model tiny-f8] [--device cpu] [--dtype fp32] [--batch-size 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from typer.testing import CliRunner

from vaetool.cli import app
from vaetool.io.images import load_image, pad_to_multiple
from vaetool.jobs import ModelSpec, load_model
from vaetool.pipeline import EngineOptions, Job, Loaded, Stages, run_pipeline

SIZES = [(256, 256), (256, 320), (320, 256), (250, 250), (192, 288), (288, 192)]  # (w, h); 250 pads to 256


def make_images(folder: Path, count: int) -> list[Path]:
    """`count` random-content PNGs (smooth gradients plus noise, so they compress like photos) cycling SIZES."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        w, h = SIZES[i % len(SIZES)]
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], axis=2)
        pixels = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)  # [h, w, 3]
        path = folder / f"img{i:03d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def engine_batches(tensors: dict[str, torch.Tensor], batch_size: int, workers: int) -> list[list[str]]:
    """The batches (keys) the engine forms from these items: same order, sizes and options as the command."""
    batches: list[list[str]] = []

    def record(images: torch.Tensor, jobs: Sequence[Job]) -> torch.Tensor:
        batches.append([job.key for job in jobs])
        return torch.zeros(len(jobs), 1)  # [B, 1]

    jobs = [Job(key, Path(key)) for key in tensors]
    stages = Stages(lambda job: Loaded(tensors[job.key]), record, lambda job, out, info: None)
    run_pipeline(jobs, stages, EngineOptions(batch_size=batch_size, workers=workers))
    return batches


def model_seconds(model: str, device: str, dtype: str, paths: list[Path], batch_size: int, workers: int) -> float:
    """Wall time of Vae.moments over the command's batches, image tensors preloaded on the device."""
    vae = load_model(ModelSpec(model=model, device=device, dtype=dtype))
    tensors = {path.name: pad_to_multiple(load_image(path), vae.downscale)[0] for path in paths}  # [3, H, W] each
    batches = [torch.stack([tensors[k] for k in keys]).to(vae.device, vae.dtype)  # [B, 3, H, W]
               for keys in engine_batches(tensors, batch_size, workers)]
    vae.moments(batches[0])  # warm-up
    _sync(vae.device)
    start = time.perf_counter()
    for batch in batches:
        mean, _ = vae.moments(batch)
        mean.float().cpu()  # the command moves every latent to the host too
    _sync(vae.device)
    return time.perf_counter() - start


def command_seconds(model: str, device: str, dtype: str, folder: Path, out: Path, batch_size: int, workers: int) -> tuple[float, float]:
    """(wall, compute) seconds `vaetool encode --json` reports for the whole folder (after the model is loaded)."""
    args = ["encode", str(folder), "-o", str(out), "--model", model, "--device", device, "--dtype", dtype,
            "--batch-size", str(batch_size), "--workers", str(workers), "--tile", "off", "--json", "--quiet", "--overwrite"]
    result = CliRunner().invoke(app, args)
    if result.exit_code != 0:
        raise SystemExit(f"encode failed: {result.stderr}")
    summary = json.loads(result.stdout)
    return float(summary["seconds"]), float(summary["compute_seconds"])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def encode_parser(doc: str | None) -> argparse.ArgumentParser:
    """The options the encode benchmarks share: model, device, dtype, image count, batch size, workers, repeats."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-f8")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="best of N for each measurement (alternating which runs first)")
    return parser


def main() -> None:
    """Run the benchmark and print images/s of the command and of the model, and their ratio."""
    parser = encode_parser(__doc__)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        paths = make_images(folder, args.images)
        model_runs, command_runs = [], []
        measure = {
            "model": lambda: model_runs.append(model_seconds(args.model, args.device, args.dtype, paths, args.batch_size, args.workers)),
            "command": lambda: command_runs.append(command_seconds(args.model, args.device, args.dtype, folder,
                                                                   Path(tmp) / "out", args.batch_size, args.workers)),
        }
        for i in range(args.repeats):  # alternate which goes first: a busy machine then favours neither
            for name in (["model", "command"] if i % 2 == 0 else ["command", "model"]):
                measure[name]()
    best = min(command_runs)
    model_ips, command_ips = args.images / min(model_runs), args.images / best[0]
    print(f"images: {args.images} ({len(SIZES)} sizes around 256 px), model {args.model}, device {args.device}, "
          f"dtype {args.dtype}, batch {args.batch_size}, workers {args.workers}, torch threads {torch.get_num_threads()}")
    print(f"model only (preloaded tensors): {model_ips:8.2f} images/s   runs (s): {', '.join(f'{t:.2f}' for t in model_runs)}")
    print(f"vaetool encode (whole command): {command_ips:8.2f} images/s   runs (s): {', '.join(f'{t:.2f}' for t, _ in command_runs)}")
    print(f"share of the command's wall time spent in the model (within one run, so machine load cancels out): {best[1] / best[0]:.1%}")
    print(f"ratio command/model: {command_ips / model_ips:.1%} (target >= 85%)")


if __name__ == "__main__":
    main()
