"""Smoke test of bench/bench_gpu.py on CPU (its --smoke mode: tiny model, 64 px, fp32): rows, ratios and the calibration print.

No timing is asserted: only that both tools ran at every point, vaetool's untiled output matched
diffusers' (same weights), and each vaetool row carries its ratios and the planner's estimate.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(sys.platform != "linux", reason="CPU peak memory is measured through /proc (Linux)")
def test_gpu_bench_smoke_runs_on_cpu_and_prints_ratios(tmp_path: Path) -> None:
    rows_file = tmp_path / "gpu.json"
    cmd = [sys.executable, str(ROOT / "bench" / "bench_gpu.py"), "--smoke", "--repeats", "1", "--json", str(rows_file)]
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(rows_file.read_text())
    got = {(r["op"], r["tool"], r["mode"]) for r in rows}
    assert got == {(op, tool, mode) for op in ("decode", "encode")
                   for tool, mode in [("vaetool", "off"), ("diffusers", "off"), ("vaetool", "exact"), ("vaetool", "fast"),
                                      ("diffusers", "diffusers-tiling")]}, got  # fmt: skip
    vaetool = [r for r in rows if r["tool"] == "vaetool"]
    assert all(r["size"] == 64 and r["dtype"] == "fp32" and r["device"] == "cpu" for r in rows)
    assert all(r["seconds"] > 0 and r["measured"] > 0 and len(r["times"]) == 1 for r in rows)
    assert all(math.isfinite(r["time_ratio"]) and r["peak_ratio"] > 0 and r["estimate"] > 0 for r in vaetool)
    assert all(r["estimate_ratio"] == pytest.approx(r["estimate"] / r["measured"]) for r in vaetool)
    untiled = [r for r in vaetool if r["mode"] == "off"]
    assert all(r["max_abs_diff_vs_diffusers"] < 1e-3 for r in untiled), untiled  # the same weights reached both tools
    out = done.stdout
    assert "no CUDA (or --smoke)" in out and "xformers skipped" in out
    assert "decode    64 fp32 sdpa     off  : vaetool" in out and "ratio time" in out and "est/meas" in out
    assert "planner calibration (cpu): now: estimate/measured" in out and "suggested: CONV_WORKSPACE['cpu']" in out
