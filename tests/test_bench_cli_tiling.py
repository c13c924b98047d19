"""Smoke test of bench/bench_cli_tiling.py in its tiny configuration: whole CLI processes run, rows and ratios print.

No timing is asserted: only that every case ran as its own process, its output was compared with
the untiled one, the budget case was checked, and the ratios were printed.
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
    assert set(rows) == {("64", "off"), ("64", "fast:32@1GiB")}, rows  # a 64 px case is its own baseline
    assert not [r for r in rows.values() if "error" in r], rows
    assert all(r["peak"] > 0 and r["cpu"] > 0 and r["base_peak"] == r["peak"] for r in rows.values())
    fast = rows[("64", "fast:32@1GiB")]
    assert math.isfinite(fast["psnr"]) and fast["maxabs"] > 0  # compared with the untiled PNG, and not equal to it
    assert fast["budget"] == 2**30 and fast["within"] is True
    assert "ratios against untiled" in done.stdout
    assert "decode 64 fast:32@1GiB: time" in done.stdout
    assert "<= budget 1024 + baseline" in done.stdout
