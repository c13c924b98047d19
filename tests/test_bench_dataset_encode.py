"""Smoke test of bench/bench_dataset_encode.py (--smoke: tiny config, 4 photos): both whole processes run and agree.

No timing is asserted: only that both tools encoded every photo, wrote the same latents, and the
throughput ratio was printed and written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(sys.platform != "linux", reason="peak RSS from os.wait4 is in KiB on Linux only")
def test_dataset_encode_bench_smoke_compares_both_tools(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    cmd = [sys.executable, str(ROOT / "bench" / "bench_dataset_encode.py"), "--smoke", "--threads", "1", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = {r["tool"]: r for r in result["rows"]}
    assert set(rows) == {"vaetool", "diffusers"}
    assert all(r["images"] == 4 and r["wall"] > 0 and r["peak"] > 0 and r["images_per_s"] > 0 for r in rows.values())
    assert result["ratio"] == pytest.approx(rows["diffusers"]["wall"] / rows["vaetool"]["wall"])
    assert result["max_abs_diff"] < 1e-3 and result["snr_db"] > 60  # the same weights, the same latents
    assert "4 photos (2 JPEG" in done.stdout
    assert "throughput ratio vaetool/diffusers:" in done.stdout and "latents: 4 compared" in done.stdout
