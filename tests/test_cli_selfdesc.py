"""`vaetool --version`, `vaetool info` with no argument, on a config, on a latent file; and that describing
the tool and its configs never imports torch (issues 12.7 and 17)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import vaetool
from vaetool.cli import app
from vaetool.io.latents import save_latent

REPO = Path(__file__).resolve().parent.parent


def _info_json(runner: CliRunner, *args: str) -> dict:
    result = runner.invoke(app, ["info", *args, "--json"])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_version(runner: CliRunner) -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"vaetool {vaetool.__version__}"


def test_info_without_argument_lists_the_shipped_models_and_not_the_recipes(runner: CliRunner) -> None:
    doc = _info_json(runner)
    rows = {row["name"]: row for row in doc["configs"]}
    assert {"mini", "sd1", "sdxl", "flux", "tiny-f8"} <= set(rows)
    assert not any(name.startswith("train-") for name in rows)  # recipes are not models
    assert {"train-mini", "train-mini-stage1"} <= set(doc["training_recipes"])
    assert rows["mini"]["weights"] == "shipped" and rows["mini"]["dtypes"] == {"float16": 180}
    assert rows["sdxl"]["weights"] == "needs --checkpoint" and rows["sdxl"]["latent_channels"] == 4
    assert rows["flux"]["latent_channels"] == 16 and rows["flux"]["family"] == "flux"
    assert rows["tiny-f8"]["test_model"] is True and rows["sdxl"]["test_model"] is False
    assert rows["sd-x4-upscaler"]["downscale"] == 4

    table = runner.invoke(app, ["info"])
    assert table.exit_code == 0, table.stderr
    lines = {line.split()[1]: line for line in table.stdout.splitlines() if line.startswith("│")}
    assert "needs --checkpoint" in lines["sdxl"] and "shipped (float16)" in lines["mini"]
    assert "test only" in lines["tiny-f8"] and "train-mini" not in lines
    assert "train-mini" in table.stdout  # named as a recipe under the table


def test_info_config_reads_the_stored_dtype_of_the_shipped_weights(runner: CliRunner) -> None:
    summary = _info_json(runner, "mini")
    assert summary["dtypes"] == {"float16": 180}
    assert summary["parameters"] == 4_085_287  # from the header's shapes, no model built
    assert summary["family"] == "vaetool-mini" and summary["latent_channels"] == 4 and summary["downscale"] == 8
    built = _info_json(runner, "mini", "--build")
    assert built["built_parameters"] == summary["parameters"]


def test_info_on_a_training_recipe_says_what_it_is(runner: CliRunner) -> None:
    result = runner.invoke(app, ["info", "train-mini"])
    assert result.exit_code == 2
    assert "training recipe" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_info_describes_a_latent_from_encode(runner: CliRunner, tmp_path: Path) -> None:
    image = tmp_path / "in" / "cat.png"
    image.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "out"
    result = runner.invoke(app, ["encode", str(image.parent), "-o", str(out), "-m", "tiny-f8", "-q", "--sample", "--seed", "7"])
    assert result.exit_code == 0, result.stderr
    summary = _info_json(runner, str(out / "cat.safetensors"))
    assert summary["kind"] == "latent" and summary["format"] == "vaetool latent"
    assert summary["shape"] == [4, 5, 6] and summary["dtype"] == "float32" and summary["form"] == "raw"
    assert summary["family"] == "sd1" and summary["original_size"] == [40, 48]
    assert summary["provenance"]["config"] == "tiny-f8" and summary["provenance"]["posterior"] == "sample"
    assert summary["provenance"]["seed"] == 7 and summary["provenance"]["checkpoint_sha256"] == "random-weights"


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".pt"])
def test_info_describes_other_latent_files(runner: CliRunner, tmp_path: Path, suffix: str) -> None:
    array = np.random.default_rng(0).standard_normal((4, 8, 6)).astype(np.float16)
    path = tmp_path / f"lat{suffix}"
    {".npy": lambda: np.save(path, array), ".npz": lambda: np.savez(path, latents=array),
     ".pt": lambda: torch.save({"latent": torch.from_numpy(array)}, path)}[suffix]()
    summary = _info_json(runner, str(path))
    assert summary["kind"] == "latent" and summary["shape"] == [4, 8, 6]
    if suffix != ".pt":
        assert summary["dtype"] == "float16"


def test_info_tells_a_scaled_latent_from_a_checkpoint(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "lat.safetensors"
    save_latent(path, torch.zeros(16, 4, 4, dtype=torch.bfloat16), {"scaled": True, "family": "flux"})
    summary = _info_json(runner, str(path))
    assert summary["kind"] == "latent" and summary["form"] == "scaled" and summary["dtype"] == "bfloat16"
    assert summary["family"] == "flux"


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["info"], ["info", "mini"], ["info", "sdxl", "--json"]])
def test_describing_never_imports_torch(args: list[str]) -> None:
    code = ("import sys, runpy\n"
            f"sys.argv = ['vaetool', *{args!r}]\n"
            "try:\n    runpy.run_module('vaetool', run_name='__main__')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "heavy = sorted(m for m in ('torch', 'numpy', 'PIL', 'safetensors') if m in sys.modules)\n"
            "assert not heavy, heavy\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "100"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr


def test_every_command_module_imports_without_torch() -> None:
    code = ("import sys\nfrom vaetool.cli.root import app\n"
            "from vaetool.cli import decode, encode, info, roundtrip, train, video\n"
            "assert 'torch' not in sys.modules and 'numpy' not in sys.modules\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr


def test_version_alone_answers_before_typer_and_says_what_the_option_says(runner: CliRunner) -> None:
    code = ("import sys\nsys.argv = ['vaetool', '--version']\nfrom vaetool.cli import main\nmain()\n"
            "assert 'typer' not in sys.modules and 'rich' not in sys.modules, 'imported'\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == runner.invoke(app, ["--version"]).stdout == f"vaetool {vaetool.__version__}\n"
