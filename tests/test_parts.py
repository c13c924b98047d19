"""Loading only the coder a command runs: load_vae(parts=...), lazy checkpoint reads, the same outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from vaetool.api import load_vae
from vaetool.checkpoints import read_state_dict, unread_keys
from vaetool.cli import app
from vaetool.errors import CheckpointError, UsageError
from vaetool.io.safe import write_safetensors

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-f8's seeded random weights as a checkpoint file."""
    path = tmp_path_factory.mktemp("parts") / "tiny.safetensors"
    vae = load_vae("tiny-f8")
    write_safetensors(path, {k: v.contiguous() for k, v in vae.model.state_dict().items()}, {})
    return path


@pytest.mark.parametrize("config", ["tiny-f8", "tiny-svd", "tiny-wan", "tiny-flux2", "tiny-taesd"])
def test_each_part_computes_what_the_whole_model_does(config: str, tmp_path: Path) -> None:
    full = load_vae(config)
    path = tmp_path / "w.safetensors"
    write_safetensors(path, {k: v.contiguous() for k, v in full.model.state_dict().items()}, {})
    encoder, decoder = load_vae(config, path, parts="encoder"), load_vae(config, path, parts="decoder")
    frames = 5 if config == "tiny-svd" else 1
    x = torch.rand(frames, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    kw = {"timesteps": frames} if config == "tiny-svd" else {}
    z = full.encode(x)
    assert torch.equal(encoder.encode(x), z)
    assert torch.equal(decoder.decode(z, **kw), full.decode(z, **kw))
    assert all(p.is_meta for p in decoder.model.encoder.parameters())
    assert not any(p.is_meta for p in decoder.model.decoder.parameters())
    assert all(p.is_meta for p in encoder.model.decoder.parameters())
    with pytest.raises(UsageError, match="cannot encode"):
        decoder.encode(x)
    with pytest.raises(UsageError, match="cannot decode"):
        encoder.decode(z)


def test_parts_survive_a_dtype_change_and_the_fp32_copy(weights: Path) -> None:
    from vaetool.precision import fp32_copy

    half = load_vae("tiny-f8", weights, parts="decoder", dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.device.type == "cpu"
    copy = fp32_copy(half)
    assert copy.parts == "decoder" and copy.dtype == torch.float32
    assert copy.decode(torch.zeros(1, 4, 4, 4)).shape == (1, 3, 32, 32)


def test_unknown_parts_is_a_usage_error(weights: Path) -> None:
    with pytest.raises(UsageError, match="parts='decode'"):
        load_vae("tiny-f8", weights, parts="decode")


def test_the_unread_half_is_still_checked_key_by_key(weights: Path, tmp_path: Path) -> None:
    sd = read_state_dict(weights)
    missing = {k: v for k, v in sd.items() if k != "decoder.conv_out.bias"}
    path = tmp_path / "missing.safetensors"
    write_safetensors(path, missing, {})
    with pytest.raises(CheckpointError, match=r"missing \(decoder.conv_out.bias\)"):
        load_vae("tiny-f8", path, parts="encoder")
    wrong = sd | {"encoder.mid.block_1.conv1.bias": torch.zeros(7)}
    write_safetensors(path, wrong, {})
    with pytest.raises(CheckpointError, match=r"wrong shape \(encoder.mid.block_1.conv1.bias \[7\]"):
        load_vae("tiny-f8", path, parts="decoder")


def test_a_whole_model_file_reads_only_the_vae(weights: Path, tmp_path: Path) -> None:
    sd = read_state_dict(weights)
    whole = {f"first_stage_model.{k}": v for k, v in sd.items()} | {"model.diffusion_model.big.weight": torch.ones(1000, 1000)}
    path = tmp_path / "whole.safetensors"
    write_safetensors(path, whole, {})
    raw = read_state_dict(path, skip=unread_keys("encoder"))
    assert raw["model.diffusion_model.big.weight"].is_meta  # the UNet's tensors are never read
    assert raw["first_stage_model.encoder.conv_in.weight"].is_meta
    assert not raw["first_stage_model.decoder.conv_in.weight"].is_meta
    assert list(raw["model.diffusion_model.big.weight"].shape) == [1000, 1000]
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    full = load_vae("tiny-f8", weights)
    assert torch.equal(load_vae("tiny-f8", path, parts="decoder").decode(z), full.decode(z))


def test_cli_decode_and_encode_load_one_coder_and_write_what_the_whole_model_does(weights: Path, tmp_path: Path) -> None:
    from PIL import Image

    from vaetool.io.images import load_image
    from vaetool.io.latents import load_latents

    runner = CliRunner()
    image = tmp_path / "img.png"
    Image.effect_noise((40, 24), 60).convert("RGB").save(image)
    model = ["-c", "tiny-f8", "--checkpoint", str(weights)]
    assert runner.invoke(app, ["encode", str(image), "-o", str(tmp_path / "lat"), *model, "-q"]).exit_code == 0
    assert runner.invoke(app, ["decode", str(tmp_path / "lat"), "-o", str(tmp_path / "png"), *model, "-q"]).exit_code == 0
    full = load_vae("tiny-f8", weights)
    z = load_latents(tmp_path / "lat" / "img.safetensors")[0].latent
    assert torch.equal(z, full.encode(load_image(image)[None])[0])
    expected = full.decode(z[None], size=(24, 40))[0]
    assert (load_image(tmp_path / "png" / "img.png") - expected).abs().max() <= 1 / 127.5 + 1e-6  # 8-bit rounding


@pytest.mark.skipif(sys.platform != "linux", reason="peak RSS from os.wait4 is in KiB on Linux only")
def test_bench_vs_diffusers_smoke(tmp_path: Path) -> None:
    rows_file = tmp_path / "rows.json"
    cmd = [sys.executable, str(ROOT / "bench" / "bench_vs_diffusers.py"), "--model", "tiny", "--size", "64", "--repeats", "1",
           "--threads", "1", "--dtypes", "fp32", "--json", str(rows_file)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(rows_file.read_text())
    assert {(r["tool"], r["dtype"]) for r in rows} == {("vaetool", "fp32"), ("diffusers", "fp32")}
    assert all(r["peak"] > 0 and r["cpu"] > 0 for r in rows)
    assert "fp32: time (wall)" in done.stdout and "PSNR vs vaetool fp32: diffusers fp32" in done.stdout
    psnr = float(done.stdout.split("PSNR vs vaetool fp32: diffusers fp32 ")[1].split()[0])
    assert psnr > 60  # the same weights decode the same image (16-bit PNGs)
