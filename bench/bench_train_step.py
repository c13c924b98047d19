"""Time `vaetool train` steps for model/crop/batch/precision options before choosing a long run's recipe.

    python bench/bench_train_step.py configs/train-mini.yaml --steps 6 \
        --option base= --option 'ch32=model.params.ddconfig.ch=32' --option 'bf16=precision=bf16'

Each option is `NAME=KEY=VALUE[;KEY=VALUE...]` (dotted keys into the training YAML, values parsed as
YAML). Every option runs in a fresh process, one at a time; the first step (warm-up, allocator) is
dropped. Prints wall and CPU seconds per step and per 1000 training pixels (crop^2 x batch), and the
model's parameter count. Wall times on a shared machine are noisy: compare CPU times too.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml


def _set(doc: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for key in keys[:-1]:
        doc = doc.setdefault(key, {})
    doc[keys[-1]] = value


def _child(config: str, overrides: str, steps: int) -> None:
    """Run `steps` training steps in this process and print one JSON line of timings."""
    import torch

    from vaetool.train import load_train_settings
    from vaetool.train.data import load_folder_images, random_batch
    from vaetool.train.loop import build_model, training_step
    from vaetool.train.settings import _model_section

    doc = yaml.safe_load(Path(config).read_text())
    doc["model"] = _model_section(doc["model"], Path(config))
    for item in filter(None, overrides.split(";")):
        key, _, value = item.partition("=")
        _set(doc, key, yaml.safe_load(value))
    settings = load_train_settings(config, doc)
    images = load_folder_images(settings.data.train, settings.data.crop, print)
    model = build_model(settings, None, False).train()
    params = [p for p in model.get_autoencoder_params() if p.requires_grad]
    opt = model.instantiate_optimizer_from_config(params, settings.lr, settings.optimizer)
    walls, cpus = [], []
    for step in range(steps + 1):
        x = random_batch(images, settings.data, step, settings.seed)  # [B, 3, crop, crop]
        w0, c0 = time.perf_counter(), time.process_time()
        training_step(model, opt, settings, x, step)
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    walls, cpus = walls[1:], cpus[1:]
    pixels = settings.data.batch_size * settings.data.crop**2 / 1000
    wall, cpu = sorted(walls)[len(walls) // 2], sorted(cpus)[len(cpus) // 2]
    print(json.dumps({"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "wall_ms_per_kpx": round(1000 * wall / pixels, 2),
                      "cpu_ms_per_kpx": round(1000 * cpu / pixels, 2), "params_m": round(sum(p.numel() for p in params) / 1e6, 3),
                      "threads": torch.get_num_threads()}))


def main() -> None:
    """Run each option in a subprocess and print a table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--option", action="append", default=[], help="NAME=KEY=VALUE[;KEY=VALUE...]")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        _child(args.config, args.child, args.steps)
        return
    for option in args.option or ["base="]:
        name, _, overrides = option.partition("=")
        t0 = time.time()
        done = subprocess.run([sys.executable, __file__, args.config, "--steps", str(args.steps), "--child", overrides],
                              capture_output=True, text=True, check=False)
        line = done.stdout.strip().splitlines()[-1] if done.returncode == 0 else f"failed: {done.stderr.strip().splitlines()[-1:]}"
        print(f"{name:12s} {line}  ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
