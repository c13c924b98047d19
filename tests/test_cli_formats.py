"""`vaetool encode --format sd-scripts|musubi` on image folders (issue 16.2): names, latents, resume, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import noise_png

from vaetool.cli import app
from vaetool.families import get_family
from vaetool.io.latents import load_latents
from vaetool.io.manifest import read_manifest
from vaetool.io.trainer_caches import settle_form


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """in/a.png 32x32, in/sub/b.png 40x24 (W x H), in/odd.png 36x36 (not a multiple of 8)."""
    root = tmp_path / "in"
    noise_png(root / "a.png", 32, 32, 1)
    noise_png(root / "sub" / "b.png", 40, 24, 2)
    noise_png(root / "odd.png", 36, 36, 3)
    return root


@pytest.mark.parametrize(("fmt", "model", "names"), [
    ("sd-scripts", "tiny-f8", {"a_0032x0032_sd.npz", "sub/b_0040x0024_sd.npz"}),
    ("musubi", "tiny-wan", {"a_0032x0032_wan.safetensors", "sub/b_0040x0024_wan.safetensors"}),
])  # fmt: skip
def test_trainer_caches_hold_the_raw_latents_vaetool_writes(runner, folder: Path, tmp_path: Path, fmt: str, model: str,
                                                          names: set[str]) -> None:
    out, plain = tmp_path / "out", tmp_path / "plain"
    args = ["encode", str(folder), "-r", "-o", str(out), "--format", fmt, "-m", model, "--quiet", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output  # odd.png fails, named; the others are written
    summary = json.loads(result.stdout)
    (failure,) = summary["failed"]
    assert failure["key"] == "odd.png" and "36 x 36 px" in failure["reason"] and "multiples of 8" in failure["reason"]
    written = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != "manifest.jsonl"}
    assert written == names
    assert runner.invoke(app, ["encode", str(folder), "-r", "-o", str(plain), "-m", model, "--quiet"]).exit_code == 0
    for name in names:
        (cache,) = load_latents(out / name)
        stem = name.split("_")[0]
        (own,) = load_latents(plain / f"{stem}.safetensors")
        family = "sd1" if fmt == "sd-scripts" else "wan"
        form = settle_form(cache.metadata, None, family, out / name)
        raw = get_family(family).to_raw(cache.latent[None])[0] if form.get("scaled") else cache.latent
        assert torch.allclose(raw, own.latent, atol=1e-5), name
    records = read_manifest(out / "manifest.jsonl")
    assert sorted(Path(r["output"]).name for r in records if r["status"] == "written") == sorted(Path(n).name for n in names)

    again = json.loads(runner.invoke(app, args).stdout)
    assert (again["done"], again["skipped"]) == (0, 2)  # this run's caches are found by name pattern and provenance
    stale = runner.invoke(app, [*args, "--sample"])
    assert stale.exit_code == 2 and "other settings" in stale.output


def test_sd_scripts_npz_is_what_sd_scripts_reads(runner, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    runner.invoke(app, ["encode", str(folder / "sub"), "-o", str(out), "--format", "sd-scripts", "-m", "tiny-f8", "--quiet"])
    with np.load(out / "b_0040x0024_sd.npz") as npz:
        assert npz["latents"].shape == (4, 3, 5) and npz["latents"].dtype == np.float32
        assert npz["original_size"].tolist() == [40, 24] and npz["crop_ltrb"].tolist() == [0, 0, 40, 24]


@pytest.mark.parametrize(("args", "problem"), [
    (["--format", "musubi", "-m", "tiny-f8"], "no latent cache for the sd1 family"),
    (["--format", "sd-scripts", "-m", "tiny-wan"], "no latent cache for the wan family"),
    (["--format", "sd-scripts", "-m", "tiny-f8", "--scaled"], "drop --scaled"),
    (["--format", "musubi", "-m", "tiny-wan", "--shard-size", "4"], "--shard-size"),
])  # fmt: skip
def test_refusals_are_usage_errors_before_any_work(runner, folder: Path, tmp_path: Path, args: list[str], problem: str) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, ["encode", str(folder), "-o", str(out), "--quiet", *args])
    assert result.exit_code == 2, result.output
    assert problem in result.output
    assert not out.exists()  # refused before the output folder is made
