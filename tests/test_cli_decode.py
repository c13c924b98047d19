"""`vaetool decode`: every latent file kind, recorded form and size, PNG metadata, resume, bad files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from vaetool.api import Vae, load_vae
from vaetool.cli import app
from vaetool.families import get_family
from vaetool.io.images import read_png_text, to_uint8
from vaetool.io.latents import save_latent
from vaetool.io.png16 import read_ihdr
from vaetool.io.shards import ShardWriter

MODEL = ["--model", "tiny-f8", "--quiet"]
SD1 = get_family("sd1")


@pytest.fixture(scope="module")
def vae() -> Vae:
    """The tiny-f8 model the command builds (seeded random weights)."""
    return load_vae("tiny-f8")


def _z(seed: int, c: int = 4, h: int = 2, w: int = 3) -> torch.Tensor:
    return torch.randn((c, h, w), generator=torch.Generator().manual_seed(seed))  # [C, h, w]


def _expected(vae: Vae, raw: torch.Tensor, size: tuple[int, int] | None = None) -> np.ndarray:
    """What decoding raw [C, h, w] must give, as 8-bit pixels [H, W, 3]."""
    image = vae.decode(raw[None]).float()[0]  # [3, H, W]
    if size is not None:
        image = image[:, : size[0], : size[1]]
    return to_uint8(image)


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to one 8-bit level (batched and single convolutions round differently)."""
    return a.shape == b.shape and int(np.abs(a.astype(int) - b.astype(int)).max()) <= 1


def _decode(runner, *args: str):
    return runner.invoke(app, ["decode", *args])


def test_every_latent_file_kind_decodes_to_the_raw_latents_image(runner, tmp_path: Path, vae: Vae) -> None:
    lat, out = tmp_path / "lat", tmp_path / "out"
    lat.mkdir()
    z = {name: _z(i) for i, name in enumerate(["own", "b0", "b1", "comfy", "legacy", "npz", "npy", "pt", "dict"])}
    save_latent(lat / "own.safetensors", z["own"], {"latent_format": "raw", "scaled": False, "family": "sd1"})
    save_latent(lat / "batch.safetensors", torch.stack([z["b0"], z["b1"]]), {"scaled": False})
    safetensors.torch.save_file({"latent_tensor": z["comfy"][None], "latent_format_version_0": torch.tensor([])}, lat / "comfy.latent")
    safetensors.torch.save_file({"latent_tensor": z["legacy"][None] * 0.18215}, lat / "legacy.latent")
    np.savez(lat / "npz.npz", latents=z["npz"].numpy(), original_size=np.array([40, 24]), crop_ltrb=np.zeros(4, int))
    np.save(lat / "npy.npy", z["npy"].numpy())
    torch.save(z["pt"], lat / "pt.pt")
    torch.save({"samples": z["dict"][None]}, lat / "dict.pt")
    result = _decode(runner, str(lat), "-o", str(out), *MODEL)
    assert result.exit_code == 0, result.output
    names = {"own": "own", "b0": "batch_0", "b1": "batch_1", "comfy": "comfy", "legacy": "legacy", "npz": "npz",
             "npy": "npy", "pt": "pt", "dict": "dict"}
    assert {p.name for p in out.iterdir()} == {f"{n}.png" for n in names.values()}
    for key, name in names.items():
        assert _close(_pixels(out / f"{name}.png"), _expected(vae, z[key])), key


def test_shard_folders_decode_item_by_item(runner, tmp_path: Path, vae: Vae) -> None:
    shards, out = tmp_path / "shards", tmp_path / "out"
    z = {key: _z(10 + i) for i, key in enumerate(["x", "y", "z"])}
    with ShardWriter(shards, shard_size=2) as writer:
        for key, latent in z.items():
            writer.add(key, latent, {"scaled": False, "original_size": [13, 21]})
    result = _decode(runner, str(shards), "-o", str(out), *MODEL)
    assert result.exit_code == 0, result.output
    for key, latent in z.items():
        assert _close(_pixels(out / f"{key}.png"), _expected(vae, latent, (13, 21)))


def test_recorded_form_wins_and_flags_cover_files_that_do_not_say(runner, tmp_path: Path, vae: Vae) -> None:
    lat, out = tmp_path / "lat", tmp_path / "out"
    raw = _z(20)
    sdxl = get_family("sdxl")  # a recorded scale other than the model's own
    save_latent(lat / "scaled.safetensors", sdxl.to_scaled(raw), {"latent_format": "scaled", "scale": sdxl.scale, "shift": sdxl.shift})
    save_latent(lat / "by_family.safetensors", sdxl.to_scaled(raw), {"scaled": True, "family": "sdxl"})
    np.save(lat / "bare.npy", SD1.to_scaled(raw).numpy())
    result = _decode(runner, str(lat), "-o", str(out), "--scaled", *MODEL)
    assert result.exit_code == 0, result.output
    want = _expected(vae, raw)
    for name in ("scaled", "by_family", "bare"):
        assert _close(_pixels(out / f"{name}.png"), want), name
    assert read_png_text(out / "bare.png")["vaetool.latent_form"] == "scaled"
    # without --scaled a bare file is read as raw: a different image
    result = _decode(runner, str(lat / "bare.npy"), "-o", str(tmp_path / "raw"), *MODEL)
    assert result.exit_code == 0, result.output
    assert not _close(_pixels(tmp_path / "raw" / "bare.png"), want)
    assert _close(_pixels(tmp_path / "raw" / "bare.png"), _expected(vae, SD1.to_scaled(raw)))


def test_output_is_cropped_to_the_recorded_size_and_carries_its_provenance(runner, tmp_path: Path, vae: Vae) -> None:
    lat, out = tmp_path / "lat" / "sub", tmp_path / "out"
    raw = _z(30)
    save_latent(lat / "img.safetensors", raw, {"scaled": False, "original_size": [11, 19]})
    result = _decode(runner, str(tmp_path / "lat"), "-r", "-o", str(out), *MODEL)
    assert result.exit_code == 0, result.output
    png = out / "sub" / "img.png"
    assert _close(_pixels(png), _expected(vae, raw, (11, 19)))
    text = read_png_text(png)
    assert text["vaetool.source"] == str(lat / "img.safetensors")
    assert json.loads(text["vaetool.model"]) == {"config": "tiny-f8", "family": "sd1", "sha256": "random-weights", "random_weights": True}
    assert text["vaetool.version"]
    assert read_ihdr(png)[2] == 8
    result = _decode(runner, str(lat), "-o", str(tmp_path / "deep"), "--16bit", *MODEL)
    assert result.exit_code == 0, result.output
    assert read_ihdr(tmp_path / "deep" / "img.png")[2] == 16


def test_existing_outputs_are_skipped_when_they_are_this_runs_unless_overwrite(runner, tmp_path: Path) -> None:
    lat, out = tmp_path / "lat", tmp_path / "out"
    save_latent(lat / "a.safetensors", _z(40), {"scaled": False})
    save_latent(lat / "b.safetensors", _z(41), {"scaled": False})
    assert _decode(runner, str(lat), "-o", str(out), *MODEL).exit_code == 0
    (out / "b.png").unlink()
    summary = json.loads(_decode(runner, str(lat), "-o", str(out), "--json", *MODEL).stdout)
    assert (summary["done"], summary["skipped"]) == (1, 1) and (out / "b.png").exists()
    (out / "a.png").write_bytes(b"stale")  # not a PNG vaetool wrote: never skipped, never silently kept
    result = _decode(runner, str(lat), "-o", str(out), "--json", *MODEL)
    assert result.exit_code == 2 and f"{out / 'a.png'}: cannot read its provenance" in result.stderr
    assert (out / "a.png").read_bytes() == b"stale"
    assert _decode(runner, str(lat), "-o", str(out), "--overwrite", *MODEL).exit_code == 0
    assert (out / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_files_are_named_and_the_rest_is_written(runner, tmp_path: Path) -> None:
    lat, out = tmp_path / "lat", tmp_path / "out"
    save_latent(lat / "good" / "ok.safetensors", _z(50), {"scaled": False})
    save_latent(lat / "blocked" / "ok2.safetensors", _z(51), {"scaled": False})
    nan = _z(52)
    nan[0, 1, 1] = float("nan")
    np.save(lat / "nan.npy", nan.numpy())
    np.save(lat / "wide.npy", _z(53, c=16).numpy())
    (lat / "empty.safetensors").write_bytes(b"")
    out.mkdir()
    (out / "blocked").write_text("a file where the output folder should be")
    result = _decode(runner, str(lat), "-r", "-o", str(out), *MODEL)
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("failed: ")]
    assert len(errors) == 4, result.stderr
    by_file = {Path(line.split(": ")[1]).name: line for line in errors}
    assert "NaN" in by_file["nan.npy"]
    assert "16 channels" in by_file["wide.npy"] and "takes 4" in by_file["wide.npy"]
    assert "empty file" in by_file["empty.safetensors"]
    assert str(out / "blocked") in by_file["ok2.safetensors"]
    assert (out / "good" / "ok.png").exists()
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temp files left


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_is_a_named_error(runner, tmp_path: Path) -> None:
    lat, out = tmp_path / "lat", tmp_path / "out"
    save_latent(lat / "a.safetensors", _z(60), {"scaled": False})
    out.mkdir()
    out.chmod(0o500)
    try:
        result = _decode(runner, str(lat), "-o", str(out), *MODEL)
    finally:
        out.chmod(0o700)
    assert result.exit_code == 1 and str(out) in result.stderr


def test_fail_fast_stops_at_the_first_bad_file(runner, tmp_path: Path) -> None:
    lat, out = tmp_path / "lat", tmp_path / "out"
    (lat).mkdir()
    (lat / "a_empty.npy").write_bytes(b"")
    save_latent(lat / "b.safetensors", _z(70), {"scaled": False})
    result = _decode(runner, str(lat), "-o", str(out), "--fail-fast", *MODEL)
    assert result.exit_code == 1
    assert not (out / "b.png").exists()


def test_a_16_channel_model_takes_16_channel_latents(runner, tmp_path: Path) -> None:
    lat, out = tmp_path / "lat", tmp_path / "out"
    save_latent(lat / "sd3.safetensors", _z(80, c=16), {"scaled": False})
    save_latent(lat / "sd1.safetensors", _z(81), {"scaled": False})
    result = _decode(runner, str(lat), "-o", str(out), "--model", "tiny-f8-16ch", "--quiet")
    assert result.exit_code == 1
    assert (out / "sd3.png").exists() and not (out / "sd1.png").exists()
    assert "has 4 channels" in result.stderr


def test_tiled_decode_matches_untiled(runner, tmp_path: Path) -> None:
    lat = tmp_path / "lat"
    save_latent(lat / "a.safetensors", _z(90, h=6, w=6), {"scaled": False})
    for mode in ("off", "exact"):
        result = _decode(runner, str(lat), "-o", str(tmp_path / mode), "--tile", mode, "--tile-size", "32", *MODEL)
        assert result.exit_code == 0, result.output
    assert _close(_pixels(tmp_path / "off" / "a.png"), _pixels(tmp_path / "exact" / "a.png"))


def test_usage_errors_exit_2(runner, tmp_path: Path) -> None:
    assert _decode(runner, "-o", str(tmp_path), *MODEL).exit_code == 2
    assert _decode(runner, str(tmp_path), *MODEL).exit_code == 2


def test_decoding_what_encode_wrote_gives_the_round_trip(runner, tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    (tmp_path / "img").mkdir()
    Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)).save(tmp_path / "img" / "a.png")
    assert runner.invoke(app, ["encode", str(tmp_path / "img"), "-o", str(tmp_path / "lat"), "--scaled", *MODEL]).exit_code == 0
    assert _decode(runner, str(tmp_path / "lat"), "-o", str(tmp_path / "dec"), *MODEL).exit_code == 0
    assert runner.invoke(app, ["roundtrip", str(tmp_path / "img"), "-o", str(tmp_path / "rt"), *MODEL]).exit_code == 0
    assert read_png_text(tmp_path / "dec" / "a.png")["vaetool.latent_form"] == "scaled"
    assert _close(_pixels(tmp_path / "dec" / "a.png"), _pixels(tmp_path / "rt" / "a.png"))  # cropped back to 20x12
