"""Smoke test of bench/bench_cli_tiling.py in its tiny configuration: whole CLI processes run, rows and ratios print.

No timing is asserted: only that every case ran, exact mode matched untiled through the CLI, the
budget case was checked against its baseline, and the ratios were printed.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(sys.platform != "linux", reason="peak RSS from os.wait4 is in KiB on Linux only")
def test_cli_bench_tiny_runs_and_prints_ratios(tmp_path: Path) -> None:
    rows_file = tmp_path / "rows.json"
    cmd = [sys.executable, str(ROOT / "bench" / "bench_cli_tiling.py"), "--tiny", "--threads", "1", "--json", str(rows_file)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {(r["size"], r["case"]): r for r in json.loads(rows_file.read_text())}
    assert not [r for r in rows.values() if "error" in r], rows
    assert {("64", "off"), ("64", "exact:32"), ("64", "fast:32@1GiB"), ("64", "baseline (off)")} <= set(rows)
    assert all(r["peak"] > 0 and r["cpu"] > 0 for r in rows.values())
    assert rows[("64", "exact:32")]["psnr"] > 60  # 16-bit PNGs of equal images (exact mode is equal to untiled)
    assert math.isfinite(rows[("64", "fast:32@1GiB")]["psnr"])
    assert rows[("64", "fast:32@1GiB")]["within"] is True  # a tiny decode stays within 1 GiB above its baseline
    assert "ratios against untiled" in done.stdout
    assert "decode 64 exact:32: time" in done.stdout
