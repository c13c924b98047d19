"""The shipped default model: in the package, small, loads by default, and passes its golden run."""

from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch
import torch
from typer.testing import CliRunner

from vaetool.api import DEFAULT_MODEL, load_vae
from vaetool.cli import app
from vaetool.config import PACKAGE_DIR

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES, GOLDEN = ROOT / "examples" / "images", ROOT / "examples" / "golden"
WEIGHTS = PACKAGE_DIR / "weights" / "mini.safetensors"


def test_default_model_is_the_shipped_one() -> None:
    assert WEIGHTS.stat().st_size <= 10 * 2**20
    vae = load_vae()
    assert DEFAULT_MODEL == "mini" and "random_weights" not in vae.source
    assert Path(vae.source["checkpoint"]) == WEIGHTS
    assert vae.latent_format.family == "vaetool-mini" and vae.latent_format.channels == 4 and vae.downscale == 8


def _roundtrip(runner: CliRunner, out: Path, *extra: str) -> object:
    return runner.invoke(app, ["roundtrip", str(EXAMPLES), "-o", str(out), "--golden", str(GOLDEN),
                               "--junit", str(out / "junit.xml"), "--report", str(out / "report.json"), *extra])


def test_golden_run_passes(runner: CliRunner, tmp_path: Path) -> None:
    result = _roundtrip(runner, tmp_path)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["passed"] and report["overall"]["vs_golden"]["images"] == len(list(GOLDEN.glob("*.png"))) >= 3


def test_golden_run_fails_when_a_weight_is_perturbed(runner: CliRunner, tmp_path: Path) -> None:
    weights = safetensors.torch.load_file(str(WEIGHTS))
    w = weights["decoder.conv_out.weight"]
    noise = torch.randn(w.shape, generator=torch.Generator().manual_seed(0)).to(w.dtype)
    weights["decoder.conv_out.weight"] = w + 0.1 * w.float().std() * noise
    bad = tmp_path / "perturbed.safetensors"
    safetensors.torch.save_file(weights, str(bad))
    result = _roundtrip(runner, tmp_path / "out", "--checkpoint", str(bad))
    assert result.exit_code == 1
    assert 'failures="0"' not in (tmp_path / "out" / "junit.xml").read_text()
    assert list((tmp_path / "out" / "heatmaps").glob("*.png"))
