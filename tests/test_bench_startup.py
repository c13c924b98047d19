"""Smoke test of bench/bench_startup.py: every command runs and gets a row (no timing is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_startup_bench_measures_every_command(tmp_path: Path) -> None:
    rows_file = tmp_path / "startup.json"
    cmd = [sys.executable, str(ROOT / "bench" / "bench_startup.py"), "--repeats", "1", "--json", str(rows_file)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(rows_file.read_text())
    assert [r["command"] for r in rows][:4] == ["python -c pass", "vaetool --version", "vaetool --help", "vaetool info sd1"]
    assert all(r["wall_s"] > 0 and r["cpu_s"] > 0 for r in rows)
    assert "vaetool --help" in done.stdout and "target 0.3 s" in done.stdout
