"""vaetool.io.trainer_writers: sd-scripts .npz and musubi-tuner .safetensors caches, checked against the trainers'
layouts written out by hand here and read back by vaetool's own readers (vaetool.io.trainer_caches)."""

from __future__ import annotations

import dataclasses
import errno
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from vaetool.errors import InputError, OutputError, OutputExistsError, UsageError
from vaetool.families import WAN_MEAN, WAN_STD, get_family
from vaetool.io import trainer_writers
from vaetool.io.latents import load_latents
from vaetool.io.trainer_caches import MUSUBI_ARCHITECTURES, SD_SCRIPTS_ARCHITECTURES, settle_form
from vaetool.io.trainer_writers import MUSUBI_WRITES, SD_SCRIPTS_WRITES, TRAINER_FORMATS, check_family, read_provenance

IMAGE_HW = (768, 512)  # a 512 x 768 (W x H) image: a 96 x 64 (h x w) latent
# (format, family) -> the file name of image "cat"
NAMES = {
    ("sd-scripts", "sd1"): "cat_0512x0768_sd.npz",
    ("sd-scripts", "sd2"): "cat_0512x0768_sd.npz",
    ("sd-scripts", "sdxl"): "cat_0512x0768_sdxl.npz",
    ("sd-scripts", "sd3"): "cat_0512x0768_sd3.npz",
    ("sd-scripts", "flux"): "cat_0512x0768_flux.npz",
    ("musubi", "wan"): "cat_0512x0768_wan.safetensors",
    ("musubi", "qwen-image"): "cat_0512x0768_qi.safetensors",
}
FLUX_SCALE, FLUX_SHIFT = 0.3611, 0.1159
MEAN = torch.tensor(WAN_MEAN)[:, None, None]  # [16, 1, 1]
STD = torch.tensor(WAN_STD)[:, None, None]


def _raw(family: str, seed: int = 0, hw: tuple[int, int] = (96, 64)) -> torch.Tensor:
    c = get_family(family).channels
    return 2 * torch.randn((c, *hw), generator=torch.Generator().manual_seed(seed))  # raw [C, h, w]


def _write(tmp_path: Path, fmt_name: str, family: str, z: torch.Tensor, **kwargs) -> Path:
    fmt = TRAINER_FORMATS[fmt_name]
    path = tmp_path / fmt.file_name("cat", IMAGE_HW, family)
    fmt.write(path, z, get_family(family), IMAGE_HW, overwrite=kwargs.pop("overwrite", False), **kwargs)
    return path


def _read_raw(path: Path, family: str) -> tuple[torch.Tensor, dict]:
    """What `vaetool decode` would decode: the reader's item, its form settled for a model of `family`, made raw."""
    [item] = load_latents(path)
    meta = settle_form(item.metadata, None, family, path)
    assert meta.get("family", family) == family
    z = get_family(family).to_raw(item.latent[None])[0] if meta["scaled"] else item.latent
    return z, meta


def test_every_supported_family_has_a_hand_written_name() -> None:
    assert {(f.name, fam) for f in TRAINER_FORMATS.values() for fam in f.families} == set(NAMES)
    assert {f.name: f.suffix for f in TRAINER_FORMATS.values()} == {"sd-scripts": ".npz", "musubi": ".safetensors"}


@pytest.mark.parametrize(("fmt_name", "family"), sorted(NAMES))
def test_written_caches_read_back_as_the_raw_latent(tmp_path: Path, fmt_name: str, family: str) -> None:
    z = _raw(family)
    path = _write(tmp_path, fmt_name, family, z)
    assert path.name == NAMES[fmt_name, family]
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temp file left
    back, meta = _read_raw(path, family)
    assert back.shape == z.shape
    assert torch.allclose(back, z, atol=1e-6, rtol=0), float((back - z).abs().max())
    size_key = {"sd-scripts": "sd_scripts_original_size", "musubi": "musubi_original_size"}[fmt_name]
    assert meta[size_key] == [512, 768]


def _sd_scripts_expects(npz: np.lib.npyio.NpzFile, bucket_wh: tuple[int, int], multi: bool) -> bool:
    """sd-scripts' is_disk_cached_latents_expected (flip_aug and alpha_mask off): keys present, latents bucket // 8."""
    h, w = bucket_wh[1] // 8, bucket_wh[0] // 8
    key = f"_{h}x{w}" if multi else ""
    return (
        all(k + key in npz for k in ("latents", "original_size", "crop_ltrb"))
        and "alpha_mask" not in npz
        and npz["latents" + key].shape[1:3] == (h, w)
    )


@pytest.mark.parametrize(("family", "key", "scaled"), [
    ("sd1", "", False), ("sd2", "", False), ("sdxl", "", False), ("sd3", "_96x64", False), ("flux", "_96x64", True),
])  # fmt: skip
def test_sd_scripts_layout(tmp_path: Path, family: str, key: str, scaled: bool) -> None:
    z = _raw(family, 1)
    path = _write(tmp_path, "sd-scripts", family, z)
    with np.load(path, allow_pickle=False) as npz:
        assert sorted(npz.files) == sorted(f"{k}{key}" for k in ("latents", "original_size", "crop_ltrb"))
        latents = npz[f"latents{key}"]
        assert latents.dtype == np.float32 and latents.shape == (z.shape[0], 96, 64)
        want = FLUX_SCALE * (z - FLUX_SHIFT) if scaled else z
        assert np.allclose(latents, want.numpy(), atol=1e-6, rtol=0)
        assert npz[f"original_size{key}"].tolist() == [512, 768]
        assert npz[f"crop_ltrb{key}"].tolist() == [0, 0, 512, 768]
        assert npz[f"original_size{key}"].dtype.kind == "i" and npz[f"crop_ltrb{key}"].dtype.kind == "i"
        assert _sd_scripts_expects(npz, (512, 768), multi=bool(key))
        assert not _sd_scripts_expects(npz, (512, 704), multi=bool(key))  # another bucket: sd-scripts would re-encode
    with zipfile.ZipFile(path) as zf:  # np.savez's layout (stored members), with dates that do not change the bytes
        assert {(i.compress_type, i.date_time) for i in zf.infolist()} == {(zipfile.ZIP_STORED, (1980, 1, 1, 0, 0, 0))}


@pytest.mark.parametrize(("family", "arch", "shape"), [
    ("wan", "wan", (16, 1, 96, 64)), ("qwen-image", "qwen_image", (16, 1, 96, 64)),
])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_musubi_layout(tmp_path: Path, family: str, arch: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    z = _raw(family, 2)
    path = _write(tmp_path, "musubi", family, z, dtype=dtype)
    dtype_name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    with safe_open(str(path), framework="pt") as f:
        assert list(f.keys()) == [f"latents_1x96x64_{dtype_name}"]
        assert f.metadata() == {"architecture": arch, "width": "512", "height": "768", "format_version": "1.0.1"}
        t = f.get_tensor(f"latents_1x96x64_{dtype_name}")
    assert t.dtype == dtype and tuple(t.shape) == shape
    want = FLUX_SCALE * (z - FLUX_SHIFT) if family == "flux" else (z - MEAN) / STD
    got = t.float().reshape(want.shape)
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    assert torch.allclose(got, want.to(dtype).float() if dtype != torch.float32 else want, atol=tol, rtol=0)


def test_musubi_name_parses_as_musubi_parses_it(tmp_path: Path) -> None:
    """musubi-tuner splits a cache name on "_": the item key (which may hold "_"), the image size W x H, the architecture."""
    name = TRAINER_FORMATS["musubi"].file_name("my_cat.v2", (40, 1024), "qwen-image")
    tokens = name.split("_")
    assert name == "my_cat.v2_1024x0040_qi.safetensors"
    assert "_".join(tokens[:-2]) == "my_cat.v2" and tokens[-2] == "1024x0040" and tokens[-1] == "qi.safetensors"


def test_tables_agree_with_the_readers() -> None:
    for family, arch in SD_SCRIPTS_WRITES.items():
        assert family in SD_SCRIPTS_ARCHITECTURES[arch][0]
    for family, musubi in MUSUBI_WRITES.items():
        assert MUSUBI_ARCHITECTURES[musubi.name] == family


@pytest.mark.parametrize(("fmt_name", "family", "words"), [
    ("sd-scripts", "wan", "sd-scripts has no latent cache for the wan family (--format sd-scripts writes sd1, sd2, sdxl, sd3, flux"),
    ("sd-scripts", "flux2", "no latent cache for the flux2 family"),
    ("musubi", "sdxl", "musubi-tuner has no latent cache for the sdxl family (--format musubi writes wan, qwen-image latents)"),
    ("musubi", "flux", "musubi-tuner has no latent cache for the flux family"),  # Kontext caches need a control latent
    ("comfy", "sd1", "unknown trainer cache format 'comfy'; choose one of sd-scripts, musubi"),
])  # fmt: skip
def test_unsupported_families_are_usage_errors(tmp_path: Path, fmt_name: str, family: str, words: str) -> None:
    with pytest.raises(UsageError, match=None) as err:
        check_family(fmt_name, family)
    assert words in str(err.value)
    if fmt_name in TRAINER_FORMATS:
        with pytest.raises(UsageError):
            TRAINER_FORMATS[fmt_name].file_name("cat", IMAGE_HW, family)
        with pytest.raises(UsageError):
            TRAINER_FORMATS[fmt_name].write(tmp_path / "x", _raw(family), get_family(family), IMAGE_HW, overwrite=False)
        assert list(tmp_path.iterdir()) == []


def test_dtypes_the_format_does_not_store_are_usage_errors(tmp_path: Path) -> None:
    check_family("musubi", "wan", torch.bfloat16)
    with pytest.raises(UsageError, match="sd-scripts caches hold float32 latents, not bfloat16"):
        check_family("sd-scripts", "sdxl", torch.bfloat16)
    with pytest.raises(UsageError, match="not float64"):
        _write(tmp_path, "musubi", "wan", _raw("wan"), dtype=torch.float64)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt_name", ["sd-scripts", "musubi"])
def test_a_latent_of_part_of_the_image_is_refused(tmp_path: Path, fmt_name: str) -> None:
    """Padding or cropping would make a cache the trainer rejects (sd-scripts) or trains on the wrong size."""
    family = "sd3" if fmt_name == "sd-scripts" else "wan"
    fmt = TRAINER_FORMATS[fmt_name]
    source = tmp_path / "cat.png"
    with pytest.raises(InputError) as err:
        fmt.write(tmp_path / "x", _raw(family), get_family(family), (770, 512), overwrite=False, source=source)
    assert err.value.path == str(source)
    assert "a 96x64 latent is 512x768 pixels, not the whole 512x770 image" in err.value.problem
    assert "multiples of 8" in err.value.problem
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("fmt_name", "family"), [("sd-scripts", "sdxl"), ("musubi", "qwen-image")])
def test_existing_files_are_kept_unless_overwrite(tmp_path: Path, fmt_name: str, family: str) -> None:
    path = _write(tmp_path, fmt_name, family, _raw(family, 3))
    before = path.read_bytes()
    with pytest.raises(OutputExistsError):
        _write(tmp_path, fmt_name, family, _raw(family, 4))
    assert path.read_bytes() == before
    _write(tmp_path, fmt_name, family, _raw(family, 4), overwrite=True)
    assert path.read_bytes() != before
    back, _ = _read_raw(path, family)
    assert torch.allclose(back, _raw(family, 4), atol=1e-6, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def _half_then_fail(target: str):
    def fail(dest, *args, **kwargs) -> None:
        if target == "npz":  # np.lib.format.write_array(member, array): half the array's bytes, then a full disk
            dest.write(b"\x93NUMPY" + bytes(1000))
        else:  # write_safetensors(path, tensors, metadata)
            Path(dest).write_bytes(b"\x10" + bytes(100))
        raise OSError(errno.ENOSPC, "No space left on device")

    return fail


@pytest.mark.parametrize(("fmt_name", "family"), [("sd-scripts", "flux"), ("musubi", "wan")])
def test_a_crash_mid_write_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt_name: str, family: str) -> None:
    if fmt_name == "sd-scripts":
        monkeypatch.setattr(np.lib.format, "write_array", _half_then_fail("npz"))
    else:
        monkeypatch.setattr(trainer_writers, "write_safetensors", _half_then_fail("safetensors"))
    with pytest.raises(OutputError, match="No space left on device"):
        _write(tmp_path, fmt_name, family, _raw(family))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("fmt_name", "family"), [("sd-scripts", "sd3"), ("musubi", "qwen-image")])
def test_equal_latents_give_equal_bytes(tmp_path: Path, fmt_name: str, family: str) -> None:
    a = _write(tmp_path / "a", fmt_name, family, _raw(family, 5))
    b = _write(tmp_path / "b", fmt_name, family, _raw(family, 5))
    assert a.read_bytes() == b.read_bytes()


def test_a_model_whose_form_is_not_the_familys_is_refused(tmp_path: Path) -> None:
    """The trainers hard-code each family's scale and statistics; a model that scales otherwise cannot fill their caches."""
    odd = dataclasses.replace(get_family("wan"), scale=0.5)
    with pytest.raises(UsageError, match=r"differs from the wan family's \(scale\), which musubi-tuner assumes"):
        TRAINER_FORMATS["musubi"].write(tmp_path / "x", _raw("wan"), odd, IMAGE_HW, overwrite=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("fmt_name", "family"), [("sd-scripts", "sdxl"), ("musubi", "wan")])
def test_provenance_is_stored_where_the_trainer_does_not_look(tmp_path: Path, fmt_name: str, family: str) -> None:
    """A rerun of `vaetool encode --format ...` reads back what run wrote each cache; the reader still loads it."""
    path = tmp_path / TRAINER_FORMATS[fmt_name].file_name("cat", IMAGE_HW, family)
    TRAINER_FORMATS[fmt_name].write(path, _raw(family), get_family(family), IMAGE_HW, overwrite=False, provenance='{"seed": 3}')
    assert read_provenance(path) == {"seed": 3}
    (item,) = load_latents(path)
    assert item.latent.shape[-2:] == (96, 64)
    plain = tmp_path / "plain" / path.name
    TRAINER_FORMATS[fmt_name].write(plain, _raw(family), get_family(family), IMAGE_HW, overwrite=False)
    assert read_provenance(plain) is None
