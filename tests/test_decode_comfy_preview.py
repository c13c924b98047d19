"""`vaetool decode` of ComfyUI files of the 2025 families (Wan 2.1 / Qwen-Image 5-D latents, Flux.2's patchified
128-channel and raw 32-channel latents), written by hand as ComfyUI's SaveLatent does, against decoding vaetool's own
latent file of the same image; and `--preview TAESD`, against the same TAESD loaded through the API."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from cli_helpers import noise_png
from PIL import Image
from torch import nn

from vaetool.api import load_vae
from vaetool.cli import app
from vaetool.config import instantiate_from_config, load_vae_config
from vaetool.families import get_family
from vaetool.io.images import read_png_text, to_uint8
from vaetool.io.latents import save_latent
from vaetool.jobs.preview import PREVIEW_CONFIGS
from vaetool.nn.taesd import PARENTS

MARKER = {"latent_format_version_0": torch.tensor([])}


def _run(runner, *args: str):
    return runner.invoke(app, [*args, "--quiet", "--batch-size", "1"])  # one latent per call: bit-equal decodes


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(int)


def _comfy(path: Path, latent: torch.Tensor) -> Path:
    """A ComfyUI SaveLatent file: latent_tensor (the VAE's latent as ComfyUI's encode returns it) and the version marker."""
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({"latent_tensor": latent.contiguous(), **MARKER}, str(path))
    return path


def _own(runner, model: list[str], image: Path, out: Path, *flags: str) -> torch.Tensor:
    """vaetool's own latent file of `image` under out/ and its tensor [C, h, w]."""
    result = _run(runner, "encode", str(image), "-o", str(out), *model, *flags)
    assert result.exit_code == 0, result.output
    return safetensors.torch.load_file(str(out / "img.safetensors"))["latent"]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 48x32 noise image (a multiple of 16: Flux.2's patchified latent needs even latent sides)."""
    return noise_png(tmp_path_factory.mktemp("img") / "img.png", 48, 32, seed=3)


@pytest.fixture(scope="module")
def flux2(tmp_path_factory: pytest.TempPathFactory, perturb: Callable[..., nn.Module]) -> tuple[list[str], nn.Module]:
    """(-c tiny-flux2 --checkpoint FILE, the model): random weights and BatchNorm statistics far from zero/one."""
    torch.manual_seed(0)
    model = perturb(instantiate_from_config(load_vae_config("tiny-flux2").model), seed=1)
    gen = torch.Generator().manual_seed(2)
    model.bn.running_mean.copy_(torch.randn(model.bn.running_mean.shape, generator=gen))
    model.bn.running_var.copy_(torch.rand(model.bn.running_var.shape, generator=gen) * 3 + 0.2)
    path = tmp_path_factory.mktemp("flux2") / "flux2.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return ["-c", "tiny-flux2", "--checkpoint", str(path)], model


def test_wan_5d_image_latents_decode_as_vaetools_own_file(runner, tmp_path: Path, image: Path) -> None:
    model = ["-m", "tiny-wan"]
    raw = _own(runner, model, image, tmp_path / "own")  # [16, 4, 6]
    comfy = tmp_path / "comfy"
    _comfy(comfy / "one.latent", raw[None, :, None])  # [1, 16, 1, 4, 6]: ComfyUI's Wan21 image latent
    _comfy(comfy / "two.latent", torch.stack([raw * 0.5, raw])[:, :, None])  # a batch of two images
    torch.save({"samples": raw[None, :, None].clone()}, comfy / "dict.pt")  # a LATENT dict saved with torch
    for out, src in (("want", tmp_path / "own"), ("got", comfy)):
        result = _run(runner, "decode", str(src), "-o", str(tmp_path / out), *model)
        assert result.exit_code == 0, result.output
    want = _pixels(tmp_path / "want" / "img.png")
    assert want.std() > 5  # an image, not a flat colour
    for name in ("one", "two_1", "dict"):
        assert np.array_equal(_pixels(tmp_path / "got" / f"{name}.png"), want), name
    assert not np.array_equal(_pixels(tmp_path / "got" / "two_0.png"), want)


def test_a_comfyui_video_latent_and_a_wrong_channel_count_fail_named(runner, tmp_path: Path) -> None:
    video = _comfy(tmp_path / "clip.latent", torch.randn(1, 16, 3, 4, 6))  # 3 latent frames
    result = _run(runner, "decode", str(video), "-o", str(tmp_path / "out"), "-m", "tiny-wan")
    assert result.exit_code == 1
    assert f"{video}: a video latent [1, 16, 3, 4, 6] (3 latent frames)" in result.stderr
    assert "`vaetool video decode`" in result.stderr and "Traceback" not in result.output
    sd = _comfy(tmp_path / "sd.latent", torch.randn(1, 4, 4, 6))  # an SD latent given to a Wan VAE
    result = _run(runner, "decode", str(sd), "-o", str(tmp_path / "out"), "-m", "tiny-wan")
    assert result.exit_code == 1
    assert f"{sd}: latent 'sd' has 4 channels but the model (wan) takes 16" in result.stderr
    assert not any((tmp_path / "out").glob("*.png"))


def test_flux2_comfyui_latents_of_either_channel_count_decode_as_upstream(runner, tmp_path: Path, image: Path, flux2) -> None:
    model, vae_model = flux2
    raw = _own(runner, model, image, tmp_path / "own")  # [32, 4, 6]
    scaled = _own(runner, model, image, tmp_path / "own_scaled", "--scaled")  # vaetool's patchified form [128, 2, 3]
    # ComfyUI's Flux.2 VAE encode: patchify "c (i pi) (j pj) -> (c pi pj) i j", then the eval-mode BatchNorm
    bn = vae_model.bn
    patched = raw.reshape(32, 2, 2, 3, 2).permute(0, 2, 4, 1, 3).reshape(1, 128, 2, 3)
    normed = torch.nn.functional.batch_norm(patched, bn.running_mean, bn.running_var, training=False, eps=bn.eps)
    assert scaled.shape == (128, 2, 3) and torch.allclose(normed[0], scaled, atol=1e-5)
    assert not torch.allclose(normed, patched, atol=0.1)  # the statistics matter: a missing unnormalise shows
    comfy = tmp_path / "comfy"
    _comfy(comfy / "c128.latent", normed)  # what ComfyUI's Flux2 latent format holds (process_in is the identity)
    _comfy(comfy / "c32.latent", raw[None])  # the VAE's raw latent, as diffusers' AutoencoderKLFlux2 gives it
    for out, src in (("want", tmp_path / "own"), ("got", comfy), ("own_scaled", tmp_path / "own_scaled")):
        result = _run(runner, "decode", str(src), "-o", str(tmp_path / out), *model)
        assert result.exit_code == 0, result.output
    want = _pixels(tmp_path / "want" / "img.png")
    assert want.std() > 5
    assert np.array_equal(_pixels(tmp_path / "got" / "c32.png"), want)
    for png in (tmp_path / "got" / "c128.png", tmp_path / "own_scaled" / "img.png"):  # float round trips: one level at most
        assert np.abs(_pixels(png) - want).max() <= 1, png
    assert read_png_text(tmp_path / "got" / "c128.png")["vaetool.latent_form"] == "scaled"
    result = _run(runner, "decode", str(comfy / "c128.latent"), "-o", str(tmp_path / "wan"), "-m", "tiny-wan")
    assert result.exit_code == 1 and "has 128 channels but the model (wan) takes 16" in result.stderr


def _diffusers_key(key: str) -> str:
    """An original TAESD key in AutoencoderTiny's layout: encoder.N -> encoder.layers.N, decoder.N -> decoder.layers.N-1."""
    coder, index, rest = key.split(".", 2)
    return f"{coder}.layers.{int(index) - (coder == 'decoder')}.{rest}"


@pytest.fixture(scope="module")
def taesd(tmp_path_factory: pytest.TempPathFactory, perturb: Callable[..., nn.Module]) -> Path:
    """A random tiny TAESD (tiny-taesd's architecture, distilled for sd1) as a checkpoint file, in diffusers' layout."""
    torch.manual_seed(0)
    model = perturb(instantiate_from_config(load_vae_config("tiny-taesd").model), seed=4)
    sd = {_diffusers_key(k): v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("taesd") / "taesd.safetensors"
    safetensors.torch.save_file(sd, str(path))
    return path


def test_preview_decodes_with_the_taesd_and_says_so(runner, tmp_path: Path, taesd: Path) -> None:
    assert load_vae_config("tiny-f8").latent_format.family == load_vae_config("tiny-taesd").latent_format.family == "sd1"
    lat, out = tmp_path / "lat", tmp_path / "out"
    raw = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(5))
    save_latent(lat / "own.safetensors", get_family("sd1").to_scaled(raw), {"scaled": True, "family": "sd1"})
    _comfy(lat / "comfy.latent", raw[None] * 0.5)
    result = _run(runner, "decode", str(lat), "-o", str(out), "-m", "tiny-f8", "--preview", str(taesd))
    assert result.exit_code == 0, result.output
    vae = load_vae(checkpoint=taesd, family="sd1")  # the same TAESD through the API
    assert type(vae.model).__name__ == "TAESD" and vae.source["layout"] == "diffusers"
    for name, z in (("own", raw), ("comfy", raw * 0.5)):
        assert np.array_equal(_pixels(out / f"{name}.png"), to_uint8(vae.decode(z[None])[0]).astype(int)), name
    text = read_png_text(out / "own.png")
    provenance = json.loads(text["vaetool.provenance"])
    assert provenance["preview"] is True and provenance["checkpoint_sha256"] == vae.source["sha256"]
    assert "TAESD" in text["vaetool.preview"] and json.loads(text["vaetool.model"])["checkpoint"] == str(taesd)
    full = _run(runner, "decode", str(lat), "-o", str(out), "-m", "tiny-f8")  # never mistaken for the full decode
    assert full.exit_code == 2 and "another run with other settings" in full.stderr
    rerun = runner.invoke(app, ["decode", str(lat), "-o", str(out), "--family", "sd2", "--preview", str(taesd), "--json"])
    summary = json.loads(rerun.stdout)
    assert rerun.exit_code == 0 and (summary["done"], summary["skipped"], summary["preview"]) == (0, 2, True)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["-m", "tiny-wan"],
            "--preview: family wan has no TAESD preview decoder; the families with one: sd1 (taesd), sd2 (taesd), "
            "sdxl (taesdxl), sd3 (taesd3), flux (taef1)",
        ),
        (["-m", "tiny-flux2"], "family flux2 has no TAESD preview decoder"),
        ([], "--preview needs the latents' family: name the full model with -m/--config"),
        (["-m", "tiny-f8", "--checkpoint", "vae.safetensors", "--ema"], "leave out --checkpoint, --ema"),
        (["-m", "tiny-f8-16ch"], "--preview: a sd3 TAESD has 16 latent channels, not 4"),
        (["--family", "sdxl", "FULL"], "--preview takes a TAESD checkpoint (taef1, taesd, taesd3, taesdxl); this is a full VAE"),
    ],
)
def test_preview_usage_errors(runner, tmp_path: Path, taesd: Path, args: list[str], message: str) -> None:
    lat = tmp_path / "a.safetensors"
    save_latent(lat, torch.zeros(4, 2, 2), {"scaled": False})
    preview = str(taesd)
    if "FULL" in args:
        args = args[:-1]
        preview = str(tmp_path / "full.safetensors")
        full = load_vae("tiny-f8").model.state_dict()
        safetensors.torch.save_file({k: v.contiguous() for k, v in full.items()}, preview)
    result = runner.invoke(app, ["decode", str(lat), "-o", str(tmp_path / "out"), "--preview", preview, *args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not any((tmp_path / "out").glob("*.png"))


def test_every_taesd_family_has_its_shipped_config() -> None:
    assert set(PREVIEW_CONFIGS) == set(PARENTS)
    for family, name in PREVIEW_CONFIGS.items():
        declared, want = load_vae_config(name).latent_format, get_family(family)
        assert (declared.channels, declared.scale, declared.shift) == (want.channels, want.scale, want.shift), family
