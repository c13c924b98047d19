"""bench/calibrate_wan_video.py: an encode case runs (smoke, no timing asserted); the encode estimate holds its measured peaks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vaetool.config import instantiate_from_config, load_vae_config
from vaetool.tiling.causal_encode import video_encode_need

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "calibrate_wan_video.py"
ENV = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

# Peak RSS of the encode (growth + weights + frames, MiB) measured by `python bench/calibrate_wan_video.py --cases encode`
# (docs/memory.md), configs/wan.yaml: (frames, height, width, dtype, tile) -> MiB.
MEASURED = {
    (9, 128, 224, "fp32", None): 638, (9, 240, 416, "fp32", None): 1715, (9, 240, 416, "fp32", 128): 605,
    (5, 240, 416, "bf16", None): 825, (9, 128, 224, "bf16", None): 341, (9, 240, 416, "bf16", None): 917,
    (9, 240, 416, "bf16", 128): 338, (5, 128, 224, "fp32", 64): 294,
}  # fmt: skip
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def test_an_encode_case_runs_in_its_own_process_and_gets_a_row() -> None:
    cmd = [sys.executable, str(SCRIPT), "--cases", "encode:5:64x96:fp32:fast:32"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=ENV)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| encode")]
    assert len(rows) == 1 and [c.strip() for c in rows[0][:5]] == ["encode", "5", "64x96", "fp32", "32"], done.stdout
    assert float(rows[0][7]) > 0 and float(rows[0][-1]) > 0  # measured MiB, estimate / measured


def test_cases_parse_with_and_without_the_op() -> None:
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from calibrate_wan_video import ENCODE_CASES, Case
    finally:
        sys.path.remove(str(SCRIPT.parent))
    assert Case.parse("9:128x224:bf16:fast:64:tiles") == Case("decode", 9, 128, 224, "bf16", 64, "tiles")
    assert Case.parse("encode:5:240x416:fp32:off") == Case("encode", 5, 240, 416, "fp32", None, "frames")
    assert len(ENCODE_CASES) == 16 and all(Case.parse(c).op == "encode" for c in ENCODE_CASES)


@pytest.mark.parametrize(("frames", "height", "width", "dtype", "tile"), list(MEASURED))
def test_the_encode_estimate_holds_its_measured_peak(frames: int, height: int, width: int, dtype: str, tile: int | None) -> None:
    """The sum without the top level's past frames and bf16's float32 norm fell to 0.87 of the measured peak (9 frames bf16)."""
    with torch.device("meta"):
        model = instantiate_from_config(load_vae_config("wan").model)
    need = video_encode_need(model, frames, height, width, DTYPES[dtype], tile) / 2**20
    assert 1.0 <= need / MEASURED[frames, height, width, dtype, tile] <= 1.2
