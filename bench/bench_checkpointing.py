"""Peak memory and step time of a training step with and without gradient checkpointing (CPU).

Each setting runs in a fresh subprocess (`--point on|off`): it builds the model from a config
(seeded random weights), trains one warm-up step, measures the peak RSS of one step with
`vaetool.memory.measure_peak` (forward, L1 + KL loss, backward, AdamW step), then times `--steps`
more steps (wall clock and process CPU time, per step).

    python bench/bench_checkpointing.py                          # mini, batch 4, 128 px crops
    python bench/bench_checkpointing.py --config tiny-f8 --batch 8 --size 256 --steps 3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

import torch

from vaetool import memory
from vaetool.config import instantiate_from_config, load_vae_config
from vaetool.nn.checkpoint import set_gradient_checkpointing


def measure_point(config: str, enabled: bool, batch: int, size: int, steps: int, threads: int) -> dict[str, Any]:
    """One setting in this process: peak bytes of a step above the resident state, seconds per step."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = instantiate_from_config(load_vae_config(config).model).train()
    set_gradient_checkpointing(model, enabled)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.rand(batch, 3, size, size) * 2 - 1

    def step() -> None:
        _, dec, reg_log = model(x)
        loss = (dec - x).abs().mean() + 1e-6 * reg_log["kl_loss"] / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up: optimizer state, oneDNN kernels
    peak = memory.measure_peak(step)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    return {"config": config, "checkpointing": enabled, "batch": batch, "size": size, "threads": threads, "peak": peak,
            "wall_per_step": (time.perf_counter() - wall) / steps, "cpu_per_step": (time.process_time() - cpu) / steps}


def run_point(args: argparse.Namespace, enabled: bool) -> dict[str, Any]:
    """Measure one setting in a fresh subprocess (the RSS high-water mark is per process)."""
    cmd = [sys.executable, __file__, "--point", "on" if enabled else "off", "--config", args.config, "--batch", str(args.batch),
           "--size", str(args.size), "--steps", str(args.steps), "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=3600)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    """Print peak memory and step time with and without checkpointing, and their ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="mini")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--point", choices=["on", "off"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point:
        print(json.dumps(measure_point(args.config, args.point == "on", args.batch, args.size, args.steps, args.threads)))
        return
    rows = {enabled: run_point(args, enabled) for enabled in (False, True)}
    print(f"{args.config}, batch {args.batch}, {args.size} px, {args.threads} threads, {args.steps} timed steps")
    print(f"{'checkpointing':>14} {'peak MiB':>10} {'wall s/step':>12} {'cpu s/step':>11}")
    for enabled, r in rows.items():
        print(f"{'on' if enabled else 'off':>14} {r['peak'] / 2**20:10.1f} {r['wall_per_step']:12.3f} {r['cpu_per_step']:11.3f}")
    off, on = rows[False], rows[True]
    print(f"peak x{on['peak'] / off['peak']:.2f}, wall x{on['wall_per_step'] / off['wall_per_step']:.2f}, "
          f"cpu x{on['cpu_per_step'] / off['cpu_per_step']:.2f}")
    print(json.dumps(list(rows.values())))


if __name__ == "__main__":
    main()
