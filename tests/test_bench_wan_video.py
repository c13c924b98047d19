"""Smoke test of bench/bench_wan_video.py: a 5-frame clip decodes through the CLI and gets a row (no timing asserted)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wan_video_bench_decodes_a_small_clip_within_its_budget() -> None:
    cmd = [sys.executable, str(ROOT / "bench" / "bench_wan_video.py"), "--frames", "5", "--size", "64", "96", "--dtype", "fp32",
           "--budgets", "1GiB", "--threads", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| 1GiB |")]
    assert len(rows) == 1 and rows[0].rstrip(" |").endswith("True"), done.stdout
