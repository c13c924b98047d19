"""Inputs that share a stem (cat.png and cat.jpg; a.safetensors and a.npy) in one folder: their outputs keep
the input's suffix in the name, whatever the order the inputs came in, and never overwrite each other (issue 12.4)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from typer.testing import CliRunner

from vaetool.cli import app
from vaetool.io.latents import load_latents, save_latent
from vaetool.io.manifest import read_manifest

MODEL = ["-m", "tiny-f8", "-q"]


def _image(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(path)
    return path


def _tree(root: Path) -> Path:
    _image(root / "cat.png", 1)
    _image(root / "cat.jpg", 2)
    _image(root / "dog.png", 3)
    return root


def _names(folder: Path, suffix: str) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob(f"*{suffix}"))


def test_encode_keeps_the_suffix_of_inputs_that_share_a_stem(runner: CliRunner, tmp_path: Path) -> None:
    images = _tree(tmp_path / "in")
    out = tmp_path / "out"
    result = runner.invoke(app, ["encode", str(images), "-o", str(out), *MODEL])
    assert result.exit_code == 0, result.stderr
    assert _names(out, ".safetensors") == ["cat.jpg.safetensors", "cat.png.safetensors", "dog.safetensors"]
    [png] = load_latents(out / "cat.png.safetensors")
    [jpg] = load_latents(out / "cat.jpg.safetensors")
    assert png.metadata["key"] == "cat.png" and jpg.metadata["key"] == "cat.jpg"
    assert not torch.equal(png.latent, jpg.latent)  # two images, two latents: neither overwrote the other
    records = {r["key"]: r for r in read_manifest(out / "manifest.jsonl")}  # the latest record per input
    assert Path(records["cat.jpg"]["output"]).name == "cat.jpg.safetensors"
    assert Path(records["dog.png"]["output"]).name == "dog.safetensors"

    # the same names whatever the order the inputs are given in
    again = tmp_path / "again"
    files = [str(images / n) for n in ("dog.png", "cat.jpg", "cat.png")]
    result = runner.invoke(app, ["encode", *files, "-o", str(again), *MODEL])
    assert result.exit_code == 0, result.stderr
    assert _names(again, ".safetensors") == _names(out, ".safetensors")
    assert torch.equal(load_latents(again / "cat.jpg.safetensors")[0].latent, jpg.latent)


def test_decode_keeps_the_suffix_of_latent_files_that_share_a_stem(runner: CliRunner, tmp_path: Path) -> None:
    lat = tmp_path / "lat"
    lat.mkdir()
    save_latent(lat / "a.safetensors", torch.zeros(4, 3, 4), {})
    np.save(lat / "a.npy", np.ones((4, 3, 4), dtype=np.float32))
    save_latent(lat / "b.safetensors", torch.zeros(4, 3, 4), {})
    out = tmp_path / "png"
    result = runner.invoke(app, ["decode", str(lat), "-o", str(out), *MODEL, "--json"])
    assert result.exit_code == 0, result.stderr
    assert _names(out, ".png") == ["a.npy.png", "a.safetensors.png", "b.png"]
    a_npy = np.asarray(Image.open(out / "a.npy.png"))
    a_st = np.asarray(Image.open(out / "a.safetensors.png"))
    assert not np.array_equal(a_npy, a_st)  # different latents, different images


def test_roundtrip_outputs_and_goldens_keep_the_suffix(runner: CliRunner, tmp_path: Path) -> None:
    images = _tree(tmp_path / "in")
    golden = tmp_path / "golden"
    out = tmp_path / "out"
    result = runner.invoke(app, ["roundtrip", str(images), "-o", str(out), "--golden", str(golden), "--update-golden", *MODEL])
    assert result.exit_code == 0, result.stderr
    assert _names(out, ".png") == ["cat.jpg.png", "cat.png.png", "dog.png"]
    assert _names(golden, ".png") == ["cat.jpg.png", "cat.png.png", "dog.png"]
    result = runner.invoke(app, ["roundtrip", str(images), "-o", str(out), "--golden", str(golden), *MODEL, "--json"])
    assert result.exit_code == 0, result.stderr
    rows = {r["image"]: r for r in json.loads(result.stdout)["images"]}
    assert {k: r["status"] for k, r in rows.items()} == {"cat.jpg": "passed", "cat.png": "passed", "dog.png": "passed"}
    assert Path(rows["cat.jpg"]["golden"]).name == "cat.jpg.png" and Path(rows["cat.png"]["golden"]).name == "cat.png.png"


def test_the_same_file_name_from_two_folders_is_still_refused(runner: CliRunner, tmp_path: Path) -> None:
    one, two = _image(tmp_path / "a" / "x.png", 1), _image(tmp_path / "b" / "x.png", 2)
    result = runner.invoke(app, ["encode", str(one), str(two), "-o", str(tmp_path / "out"), *MODEL])
    assert result.exit_code == 1
    assert "same output" in result.stderr and len(result.stderr.strip().splitlines()) == 1
