"""bench/calibrate_memory.py --dtype: a bf16 point runs (smoke, no timing asserted); the bf16 image estimates hold their measured peaks."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vaetool import memory

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "calibrate_memory.py"
ENV = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
MiB = 2**20

# The highest peak RSS (MiB: growth + weights + input) measured in fresh processes by
# `python bench/calibrate_memory.py --dtype bf16` (docs/memory.md, 1 and 2 threads): (config, op, px) -> MiB.
MEASURED_BF16 = {
    ("sd1", "encode", 256): 132.3, ("sd1", "encode", 512): 234.6, ("sd1", "encode", 1024): 653.8,
    ("sd1", "decode", 256): 252.7, ("sd1", "decode", 512): 380.2, ("sd1", "decode", 1024): 957.9,
    ("wan", "encode", 256): 176.6, ("wan", "encode", 512): 397.8, ("wan", "decode", 256): 226.6, ("wan", "decode", 512): 444.3,
    ("flux2", "encode", 256): 131.8, ("flux2", "decode", 256): 239.2,
}  # fmt: skip


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS measurement needs Linux")
def test_a_bf16_point_runs_in_its_own_process_and_gets_a_row() -> None:
    cmd = [sys.executable, str(SCRIPT), "--configs", "tiny-f8", "--ops", "encode", "--sizes", "64", "--dtype", "bf16", "--threads", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=ENV)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in done.stdout.splitlines() if line.startswith("| tiny-f8")]
    assert len(rows) == 1 and rows[0][:4] == ["tiny-f8", "encode", "64", "bf16"], done.stdout
    assert float(rows[0][6]) > 0 and float(rows[0][8]) > 0  # measured MiB, estimate / measured


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS measurement needs Linux")
def test_a_bf16_point_counts_two_byte_weights_and_input() -> None:
    cmd = [sys.executable, str(SCRIPT), "--point", "tiny-f8", "decode", "64", "--dtype", "bf16", "--threads", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=ENV, check=True)
    point = json.loads(done.stdout.strip().splitlines()[-1])
    arch = memory.architecture("tiny-f8")
    latent = arch.latent_channels * (64 // arch.downscale) ** 2
    assert point["dtype"] == "bf16" and point["resident"] == 2 * (arch.weights["decode"] + latent)


@pytest.mark.parametrize(("config", "op", "size"), list(MEASURED_BF16))
def test_the_bf16_estimate_holds_its_measured_peak(config: str, op: str, size: int) -> None:
    """Without Wan's float32 norm copies and the LDM decoders' retained buffers these fell to 0.95 and 0.83."""
    estimate = memory.estimate_peak(config, op, size, size, 1, torch.bfloat16) / MiB
    assert 1.0 <= estimate / MEASURED_BF16[config, op, size] <= 1.2


def test_the_half_decode_overhead_leaves_fp32_and_accelerators_alone() -> None:
    arch = memory.architecture("sd1")
    bare = dataclasses.replace(arch, half_overhead={})

    def both(dtype: torch.dtype, device: str = "cpu") -> tuple[int, int]:
        return tuple(memory.estimate_peak(a, "decode", 512, 512, 1, dtype, device=device) for a in (arch, bare))  # type: ignore[return-value]

    assert both(torch.float32)[0] == both(torch.float32)[1]
    assert both(torch.bfloat16, "cuda")[0] == both(torch.bfloat16, "cuda")[1]
    assert both(torch.bfloat16)[0] > both(torch.bfloat16)[1]
