"""Smoke test of bench/bench_layouts.py: every variant runs in its own process and gets a row per shape (no timing asserted)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_layout_bench_prints_a_row_per_variant_and_shape() -> None:
    cmd = [sys.executable, str(ROOT / "bench" / "bench_layouts.py"), "--smoke", "--op", "decode", "--malloc", "keep"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| ") and "x" in line.split("|")[2]]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [
        (v, s) for v in ("plain-layout", "nhwc-unbanded", "nhwc-banded") for s in ("2 x 64 x 48", "1 x 64 x 64")
    ]
    assert all(float(r[2]) > 0 and int(r[5]) > 0 for r in rows)  # wall seconds, peak RSS
