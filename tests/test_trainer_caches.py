"""`vaetool decode` reads the trainers' latent caches: sd-scripts .npz, musubi-tuner .safetensors,
SimpleTuner .pt / .pt.gz and OneTrainer .pt, each built here the way its trainer writes it.

Every cache is decoded next to a vaetool file holding the same numbers in the form the trainer
stores them (raw, or scaled with the family's scale/shift/statistics), and the two PNGs must agree
within one 8-bit level; bad caches are named and fail alone.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import zlib
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from vaetool.cli import app
from vaetool.families import get_family
from vaetool.io.latents import load_latents, save_latent
from vaetool.limits import MAX_GZIP_LATENT

SHA = "0123456789abcdef" * 4  # SimpleTuner names a cache by the sha256 of the image's name


def _z(seed: int, c: int = 4, h: int = 3, w: int = 2) -> torch.Tensor:
    return torch.randn((c, h, w), generator=torch.Generator().manual_seed(seed))  # raw [C, h, w]


def _scaled(family: str, raw: torch.Tensor) -> torch.Tensor:
    return get_family(family).to_scaled(raw[None])[0]  # [C, h, w] as the diffusion model sees it


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(int)


def _same(a: Path, b: Path) -> None:
    pa, pb = _pixels(a), _pixels(b)
    assert pa.shape == pb.shape, (a.name, pa.shape, pb.shape)
    assert int(np.abs(pa - pb).max()) <= 1, a.name  # batched and single convolutions round differently


def _decode(runner, files: list[Path] | Path, out: Path, *model: str) -> tuple[int, dict]:
    args = [str(f) for f in files] if isinstance(files, list) else [str(files)]
    result = runner.invoke(app, ["decode", *args, "-o", str(out), "--json", "--quiet", *model])
    return result.exit_code, json.loads(result.stdout) if result.stdout.strip() else {"output": result.output}


def _failed(summary: dict) -> dict[str, str]:
    return {Path(r["source"]).name: r["reason"] for r in summary.get("failed", [])}


def _ref(lat: Path, name: str, tensor: torch.Tensor, family: str, scaled: bool) -> None:
    """The same numbers as a vaetool file, in the same form."""
    save_latent(lat / f"{name}.safetensors", tensor, {"scaled": scaled, "family": family})


def test_sd_scripts_caches_from_vaetool_encode(runner, tmp_path: Path) -> None:
    """A latent from `vaetool encode`, written as sd-scripts writes it (with every optional key), decodes the same."""
    img, lat, enc = tmp_path / "img", tmp_path / "lat", tmp_path / "enc"
    img.mkdir()
    lat.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 40, 3), dtype=np.uint8)).save(img / "photo.png")
    result = runner.invoke(app, ["encode", str(img), "-o", str(enc), "-m", "tiny-f8", "--quiet"])
    assert result.exit_code == 0, result.output
    [item] = load_latents(enc / "photo.safetensors")
    z = item.latent.numpy()  # raw [4, 3, 5]
    kwargs = {"latents": z, "original_size": np.array([40, 24]), "crop_ltrb": np.array([0, 0, 40, 24]),
              "latents_flipped": z[..., ::-1].copy(), "alpha_mask": np.ones((24, 40), np.float32)}
    np.savez(lat / "photo_0040x0024_sd.npz", **kwargs)
    np.savez(lat / "photo.npz", latents=z, original_size=np.array([40, 24]), crop_ltrb=np.array([0, 0, 40, 24]))  # old names
    _ref(lat, "ref", item.latent, "sd1", False)
    code, summary = _decode(runner, lat, tmp_path / "out", "-m", "tiny-f8")
    assert code == 0, summary
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["photo.png", "photo_0040x0024_sd.png", "ref.png"]  # flipped not decoded
    _same(out / "photo_0040x0024_sd.png", out / "ref.png")
    _same(out / "photo.png", out / "ref.png")
    with Image.open(out / "photo_0040x0024_sd.png") as im:
        assert im.size == (40, 24) and im.text["vaetool.latent_form"] == "raw"  # the bucket's size: nothing cropped


def test_sd_scripts_family_comes_from_the_name(runner, tmp_path: Path) -> None:
    """_sdxl caches need an SDXL model (here --family sdxl); with the sd1 model they fail, named."""
    lat = tmp_path / "lat"
    lat.mkdir()
    np.savez(lat / "a_0016x0024_sdxl.npz", latents=_z(1).numpy(), original_size=np.array([16, 24]), crop_ltrb=np.zeros(4, int))
    _ref(lat, "ref", _z(1), "sdxl", False)
    code, summary = _decode(runner, lat, tmp_path / "out", "-m", "tiny-f8", "--family", "sdxl")
    assert code == 0, summary
    _same(tmp_path / "out" / "a_0016x0024_sdxl.png", tmp_path / "out" / "ref.png")
    code, summary = _decode(runner, lat / "a_0016x0024_sdxl.npz", tmp_path / "out1", "-m", "tiny-f8")
    assert code == 1
    assert "holds sdxl latents but the model's family is sd1" in _failed(summary)["a_0016x0024_sdxl.npz"]


def test_flux_and_sd3_multi_resolution_caches(runner, tmp_path: Path) -> None:
    """Flux stores scale * (z - shift) under latents_{h}x{w}, one item per size; SD3 stores raw; an unnamed file takes --family."""
    lat = tmp_path / "lat"
    lat.mkdir()
    big, small = _z(2, 16, 4, 3), _z(3, 16, 2, 2)
    np.savez(lat / "p_0024x0032_flux.npz", latents_4x3=_scaled("flux", big).numpy(), original_size_4x3=np.array([24, 32]),
             crop_ltrb_4x3=np.zeros(4, int), latents_2x2=_scaled("flux", small).numpy(), original_size_2x2=np.array([16, 16]),
             crop_ltrb_2x2=np.zeros(4, int))
    np.savez(lat / "q_0024x0032_sd3.npz", latents_4x3=big.numpy(), original_size_4x3=np.array([24, 32]), crop_ltrb_4x3=np.zeros(4, int))
    _ref(lat, "big", _scaled("flux", big), "flux", True)
    _ref(lat, "small", _scaled("flux", small), "flux", True)
    code, summary = _decode(runner, [lat / "p_0024x0032_flux.npz", lat / "big.safetensors", lat / "small.safetensors"],
                            tmp_path / "flux", "-m", "tiny-f8-16ch", "--family", "flux")
    assert code == 0, summary
    out = tmp_path / "flux"
    _same(out / "p_0024x0032_flux_4x3.png", out / "big.png")
    _same(out / "p_0024x0032_flux_2x2.png", out / "small.png")
    code, summary = _decode(runner, [lat / "q_0024x0032_sd3.npz", lat / "p_0024x0032_flux.npz"], tmp_path / "sd3", "-m", "tiny-f8-16ch")
    assert code == 1 and set(_failed(summary)) == {"p_0024x0032_flux.npz"}, summary  # the sd3 model refuses the Flux cache
    _ref(lat, "raw", big, "sd3", False)
    (lat / "big.safetensors").unlink()
    (lat / "small.safetensors").unlink()
    (lat / "p_0024x0032_flux.npz").rename(lat / "renamed.npz")  # no architecture in the name: SD3 or Flux
    code, summary = _decode(runner, [lat / "renamed.npz", lat / "q_0024x0032_sd3.npz", lat / "raw.safetensors"],
                            tmp_path / "sd3b", "-m", "tiny-f8-16ch")
    assert code == 0, summary
    _same(tmp_path / "sd3b" / "q_0024x0032_sd3.png", tmp_path / "sd3b" / "raw.png")
    assert int(np.abs(_pixels(tmp_path / "sd3b" / "renamed_4x3.png") - _pixels(tmp_path / "sd3b" / "raw.png")).max()) > 8  # read as raw SD3
    code, summary = _decode(runner, lat / "renamed.npz", tmp_path / "flux2", "-m", "tiny-f8-16ch", "--family", "flux")
    assert code == 0, summary
    _same(tmp_path / "flux2" / "renamed_4x3.png", out / "big.png")


def _musubi(path: Path, tensor: torch.Tensor, arch: str, **extra: str) -> None:
    frames, h, w = tensor.shape[1:] if tensor.ndim == 4 else (1, *tensor.shape[1:])
    dtype = str(tensor.dtype).removeprefix("torch.")
    meta = {"architecture": arch, "width": "32", "height": "24", "format_version": "1.0.1", **extra}
    safetensors.torch.save_file({f"latents_{frames}x{h}x{w}_{dtype}": tensor.contiguous()}, str(path), metadata=meta)


def test_musubi_caches(runner, tmp_path: Path) -> None:
    """Wan / Qwen-Image caches hold normalized C,1,H,W latents (bf16 here); video caches and unknown VAEs fail, named."""
    lat = tmp_path / "lat"
    lat.mkdir()
    wan = _scaled("wan", _z(4, 16)).to(torch.bfloat16)  # [16, 3, 2]
    _musubi(lat / "a_0016x0024_wan.safetensors", wan[:, None], "wan", frame_count="1")
    _musubi(lat / "b_0016x0024_qi.safetensors", wan[:, None], "qwen_image")
    _musubi(lat / "v_0016x0024_wan.safetensors", torch.stack([wan, wan], 1), "wan", frame_count="5")
    _musubi(lat / "h_0016x0024_hv.safetensors", wan[:, None], "hunyuan_video")
    safetensors.torch.save_file({"varlen_t5_bfloat16": torch.zeros(3, 4)}, str(lat / "t_wan_te.safetensors"),
                                metadata={"architecture": "wan", "caption1": "x", "format_version": "1.0.1"})
    _ref(lat, "ref", wan, "wan", True)
    code, summary = _decode(runner, lat, tmp_path / "out", "-m", "tiny-wan")
    assert code == 1
    failed = _failed(summary)
    assert set(failed) == {"b_0016x0024_qi.safetensors", "v_0016x0024_wan.safetensors", "h_0016x0024_hv.safetensors",
                           "t_wan_te.safetensors"}, failed
    assert "qwen-image latents but the model's family is wan" in failed["b_0016x0024_qi.safetensors"]
    assert "2-frame video latent" in failed["v_0016x0024_wan.safetensors"]
    assert "'hunyuan_video', whose VAE vaetool does not have" in failed["h_0016x0024_hv.safetensors"]
    assert "no latents_FxHxW_dtype tensor" in failed["t_wan_te.safetensors"]
    _same(tmp_path / "out" / "a_0016x0024_wan.png", tmp_path / "out" / "ref.png")
    (lat / "ref.safetensors").unlink()
    _ref(lat, "ref", wan, "qwen-image", True)
    code, summary = _decode(runner, [lat / "b_0016x0024_qi.safetensors", lat / "ref.safetensors"], tmp_path / "qi",
                            "-m", "tiny-wan", "--family", "qwen-image")
    assert code == 0, summary
    _same(tmp_path / "qi" / "b_0016x0024_qi.png", tmp_path / "qi" / "ref.png")


def _torch_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_simpletuner_caches_need_the_family(runner, tmp_path: Path) -> None:
    """Scaled tensors (or {"latents": ...}), plain or gzip (.pt.gz, or gzip under a .pt name); the family comes from --family."""
    lat = tmp_path / "lat"
    lat.mkdir()
    z = _scaled("sd1", _z(5))
    (lat / f"{SHA}.pt").write_bytes(_torch_bytes(z))
    (lat / f"{SHA[::-1]}.pt.gz").write_bytes(gzip.compress(_torch_bytes({"latents": z})))
    (lat / "named.pt").write_bytes(gzip.compress(_torch_bytes(z)))
    _ref(lat, "ref", z, "sd1", True)
    code, summary = _decode(runner, lat, tmp_path / "out", "-m", "tiny-f8")
    assert code == 1
    failed = _failed(summary)
    assert set(failed) == {f"{SHA}.pt", f"{SHA[::-1]}.pt.gz", "named.pt"}, failed
    assert all("does not record its model family" in r and "pass --family" in r for r in failed.values()), failed
    code, summary = _decode(runner, lat, tmp_path / "out", "-m", "tiny-f8", "--family", "sd1")
    assert code == 0, summary
    for name in (SHA, SHA[::-1], "named"):
        _same(tmp_path / "out" / f"{name}.png", tmp_path / "out" / "ref.png")


def test_onetrainer_caches_are_raw(runner, tmp_path: Path) -> None:
    lat = tmp_path / "lat"
    lat.mkdir()
    z = _z(6).to(torch.float16)
    torch.save({"latent_image": z, "original_resolution": (48, 40), "crop_resolution": (24, 16), "crop_offset": (0, 0),
                "image_path": "/data/x.png", "prompt": "a cat"}, lat / "0.pt")
    _ref(lat, "ref", z, "sd1", False)
    code, summary = _decode(runner, lat, tmp_path / "out", "-m", "tiny-f8")
    assert code == 0, summary
    _same(tmp_path / "out" / "0.png", tmp_path / "out" / "ref.png")
    [item] = load_latents(lat / "0.pt")
    assert item.metadata["source_format"] == "onetrainer" and item.metadata["onetrainer_original_resolution"] == [48, 40]


class _Evil:
    def __reduce__(self) -> tuple:
        return (os.getcwd, ())


def _gzip_bomb(size: int) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(2**20)
    return b"".join(packer.compress(block) for _ in range(size // 2**20)) + packer.flush()


def test_bad_caches_are_named_and_the_good_ones_written(runner, tmp_path: Path) -> None:
    lat = tmp_path / "lat"
    lat.mkdir()
    np.savez(lat / "good_0016x0024_sd.npz", latents=_z(7).numpy(), original_size=np.array([16, 24]), crop_ltrb=np.zeros(4, int))
    blob = (lat / "good_0016x0024_sd.npz").read_bytes()
    (lat / "cut_0016x0024_sd.npz").write_bytes(blob[: len(blob) // 2])
    np.savez(lat / "nokey_0016x0024_sd.npz", original_size=np.array([16, 24]), crop_ltrb=np.zeros(4, int))
    np.savez(lat / "x_0016x0024_anima.npz", latents=_z(7).numpy())
    (lat / f"{SHA}.pt").write_bytes(pickle.dumps({"latent_image": _Evil()}, protocol=2))
    (lat / "evil.pt.gz").write_bytes(gzip.compress(pickle.dumps({"latents": _Evil()}, protocol=2)))
    (lat / "bomb.pt.gz").write_bytes(_gzip_bomb(MAX_GZIP_LATENT + 2**20))
    (lat / "cut.pt.gz").write_bytes(gzip.compress(_torch_bytes(_z(7)))[:-20])
    (lat / "nolatents.pt.gz").write_bytes(gzip.compress(_torch_bytes({"text_embeds": _z(7)})))
    (lat / "two.pt.gz").write_bytes(gzip.compress(_torch_bytes(_z(7))) * 2)  # SimpleTuner writes one gzip member
    code, summary = _decode(runner, lat, tmp_path / "out", "-m", "tiny-f8", "--family", "sd1")
    assert code == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good_0016x0024_sd.png"]
    failed = _failed(summary)
    assert set(failed) == {"cut_0016x0024_sd.npz", "nokey_0016x0024_sd.npz", "x_0016x0024_anima.npz", f"{SHA}.pt",
                           "evil.pt.gz", "bomb.pt.gz", "cut.pt.gz", "nolatents.pt.gz", "two.pt.gz"}, failed
    assert "truncated or corrupt .npz" in failed["cut_0016x0024_sd.npz"]
    assert "no latent array inside" in failed["nokey_0016x0024_sd.npz"]
    assert "sd-scripts cache for 'anima'" in failed["x_0016x0024_anima.npz"]
    assert "unsafe pickle: it would import" in failed[f"{SHA}.pt"] and "getcwd" in failed[f"{SHA}.pt"]
    assert "unsafe pickle" in failed["evil.pt.gz"]
    assert "gzip bomb" in failed["bomb.pt.gz"]
    assert "truncated gzip" in failed["cut.pt.gz"]
    assert "without 'latents'" in failed["nolatents.pt.gz"]
    assert "data after the end of its stream" in failed["two.pt.gz"]
    assert all("\n" not in r for r in failed.values())


@pytest.mark.parametrize("name", ["x.pt.gz", "x.npz", "x.safetensors"])
def test_latent_stem_names_outputs(tmp_path: Path, name: str) -> None:
    """A .pt.gz cache is named without both suffixes, like every other latent file."""
    path = tmp_path / name
    {"x.pt.gz": lambda: path.write_bytes(gzip.compress(_torch_bytes({"latents": _z(8)}))),
     "x.npz": lambda: np.savez(path, latents=_z(8).numpy()),
     "x.safetensors": lambda: save_latent(path, _z(8), {"scaled": False})}[name]()
    assert [i.name for i in load_latents(path)] == ["x"]
