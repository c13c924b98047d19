"""Smoke test of bench/bench_wan_video_encode.py: a 5-frame clip encodes through the CLI, untiled and tiled (no timing asserted)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wan_video_encode_bench_gets_a_row_per_case() -> None:
    cmd = [sys.executable, str(ROOT / "bench" / "bench_wan_video_encode.py"), "--frames", "5", "--size", "64", "96",
           "--cases", "off", "fast:32", "--threads", "1"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2:] for line in done.stdout.splitlines() if line.startswith("| ")}
    assert rows["off"][0].strip() == "off" and rows["fast:32"][0].strip() == "fast 32 px", done.stdout
    assert 15 < float(rows["fast:32"][-2]) < 60, done.stdout  # PSNR vs off: 26.8 dB measured
