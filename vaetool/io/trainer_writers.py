"""Writers of the trainers' own latent caches: sd-scripts .npz and musubi-tuner .safetensors, laid out
as each trainer writes them, so that the trainer finds them and does not encode the images again.

The readers (vaetool.io.trainer_caches) hold the tables of what each trainer's file names and
metadata mean; the writers take the latent form (raw or scaled) from those same tables, so a file
written here always reads back as the latent that was written. `latent` is always the RAW latent
[C, h, w] the encoder gives; each format applies its own scaling. Every file is written atomically
(vaetool.io.atomic) and its bytes depend only on the latent, the family and the image size.

- sd-scripts (`{stem}_{W:04d}x{H:04d}_{arch}.npz`, next to the image): `latents` float32 [C, h, w],
  `original_size` [W, H], `crop_ltrb` [0, 0, W, H]; SD3 and Flux suffix every key with `_{h}x{w}`.
- musubi-tuner (`{stem}_{W:04d}x{H:04d}_{short arch}.safetensors`, in the cache directory): one
  tensor `latents_1x{h}x{w}_{dtype}`, metadata architecture / width / height / format_version.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vaetool.errors import InputError, UsageError, first_line
from vaetool.families import LatentFormat, get_family
from vaetool.io.atomic import atomic_write
from vaetool.io.safe import safetensors_header, write_safetensors
from vaetool.io.trainer_caches import SD_SCRIPTS_ARCHITECTURES, SD_SCRIPTS_MULTI

__all__ = [
    "MUSUBI_WRITES", "SD_SCRIPTS_WRITES", "TRAINER_FORMATS", "MusubiArch", "TrainerFormat", "check_family", "dtype_name",
    "read_provenance", "write_npz",
]  # fmt: skip

NPZ_DATE = (1980, 1, 1, 0, 0, 0)  # a fixed zip timestamp: equal latents give equal bytes
MUSUBI_FORMAT_VERSION = "1.0.1"
MUSUBI_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# sd-scripts: family -> the architecture at the end of the file name (SD_SCRIPTS_ARCHITECTURES reads it back;
# whether the cache is scaled comes from that table, whether its keys carry _{h}x{w} from SD_SCRIPTS_MULTI)
SD_SCRIPTS_WRITES: dict[str, str] = {"sd1": "sd", "sd2": "sd", "sdxl": "sdxl", "sd3": "sd3", "flux": "flux"}


@dataclass(frozen=True)
class MusubiArch:
    """One musubi-tuner image architecture: its metadata name, its file-name name, the latent's layout."""

    name: str  # metadata "architecture" (MUSUBI_ARCHITECTURES reads it back)
    short: str  # the end of the file name (musubi's ARCHITECTURE_* short names)
    frame_axis: bool  # the tensor is [C, 1, h, w] (Wan, Qwen-Image) rather than [C, h, w] (FLUX.1 Kontext)


# musubi-tuner: family -> the architecture its caches are written as (all store the family's scaled form).
# FLUX.1 Kontext ("flux_kontext", "fk", [C, h, w]) is read but not written: its trainer needs a control
# latent (latents_control_*) in every cache file, which an image alone cannot give; a file it cannot train
# on would be an output that looks right and is not.
MUSUBI_WRITES: dict[str, MusubiArch] = {
    "wan": MusubiArch("wan", "wan", True),
    "qwen-image": MusubiArch("qwen_image", "qi", True),
}
PROVENANCE_KEY = "provenance"  # musubi metadata key, as in vaetool's own files (vaetool.jobs.provenance)
PROVENANCE_MEMBER = "vaetool_provenance"  # the npz member holding a vaetool cache's provenance (trainers ignore it)


@dataclass(frozen=True)
class TrainerFormat:
    """A trainer's latent cache: its file suffix, the families it has caches for, its naming and its writer."""

    name: str  # the --format value
    trainer: str  # how messages name the trainer
    suffix: str
    families: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]  # the latent dtypes the format stores (the first is the default)
    namer: Callable[[str, tuple[int, int], str], str]
    writer: Callable[[torch.Tensor, LatentFormat, tuple[int, int], torch.dtype, str | None], Callable[[Path], None]]  # -> write(tmp)

    def file_name(self, stem: str, image_hw: tuple[int, int], family: str) -> str:
        """The cache's file name for an image named `stem` (its name without suffix) of `image_hw` (H, W) pixels."""
        check_family(self.name, family)
        return self.namer(stem, image_hw, family.lower())

    def write(
        self,
        path: Path,
        latent: torch.Tensor,
        fmt: LatentFormat,
        image_hw: tuple[int, int],
        *,
        overwrite: bool,
        dtype: torch.dtype = torch.float32,
        source: Path | None = None,
        provenance: str | None = None,
    ) -> None:
        """Write the RAW latent [C, h, w] of a whole image of `image_hw` (H, W) pixels as this format's cache, atomically.

        UsageError for a family or dtype the format has no cache for; InputError (naming `source`, the
        image, or else `path`) when the latent is not of the whole image; OutputExistsError when `path`
        exists and not `overwrite`. `provenance` (JSON) is stored where the trainer does not look (read_provenance).
        """
        check_family(self.name, fmt.family, dtype)
        if latent.ndim != 3:
            raise ValueError(f"expected a latent [C, h, w], got {tuple(latent.shape)}")
        h, w = (int(n) for n in latent.shape[1:])
        if (h * fmt.downscale, w * fmt.downscale) != tuple(image_hw):
            raise InputError(
                f"a {h}x{w} latent is {w * fmt.downscale}x{h * fmt.downscale} pixels, not the whole {image_hw[1]}x{image_hw[0]} "
                f"image; {self.trainer} caches hold the latent of the whole image, whose sides must be multiples of "
                f"{fmt.downscale}",
                source or path,
            )
        _check_form(fmt, self.trainer)
        content = self.writer(latent.detach().to("cpu", torch.float32), fmt, tuple(image_hw), dtype, provenance)
        atomic_write(path, content, overwrite=overwrite)


def check_family(format_name: str, family: str, dtype: torch.dtype = torch.float32) -> None:
    """UsageError when `format_name` is no trainer format, has no cache for `family`, or does not store `dtype`."""
    fmt = TRAINER_FORMATS.get(format_name)
    if fmt is None:
        raise UsageError(f"unknown trainer cache format {format_name!r}; choose one of {', '.join(TRAINER_FORMATS)}")
    if family.lower() not in fmt.families:
        raise UsageError(
            f"{fmt.trainer} has no latent cache for the {family} family (--format {fmt.name} writes {', '.join(fmt.families)} latents)"
        )
    if dtype not in fmt.dtypes:
        names = ", ".join(map(dtype_name, fmt.dtypes))
        raise UsageError(f"{fmt.trainer} caches hold {names} latents, not {dtype_name(dtype)}")


def _check_form(fmt: LatentFormat, trainer: str) -> None:
    """UsageError when `fmt` scales latents otherwise than its family's form, the one the trainer assumes."""
    family = get_family(fmt.family)
    fields = ("scale", "shift", "mean", "std", "patch")
    if any(getattr(fmt, f) != getattr(family, f) for f in fields):
        differ = ", ".join(f for f in fields if getattr(fmt, f) != getattr(family, f))
        raise UsageError(
            f"the model's latent form differs from the {fmt.family} family's ({differ}), "
            f"which {trainer} assumes; its caches cannot hold these latents"
        )


def dtype_name(dtype: torch.dtype) -> str:
    """A dtype as musubi-tuner names it at the end of a tensor key ("float32", "bfloat16": its dtype_to_str)."""
    return str(dtype).removeprefix("torch.")


def _size_name(stem: str, image_hw: tuple[int, int], arch: str, suffix: str) -> str:
    height, width = image_hw
    return f"{stem}_{width:04d}x{height:04d}_{arch}{suffix}"


def _stored(latent: torch.Tensor, fmt: LatentFormat, scaled: bool, dtype: torch.dtype) -> torch.Tensor:
    """The raw latent [C, h, w] in the form and dtype a cache stores it."""
    z = fmt.to_scaled(latent[None])[0] if scaled else latent  # [C, h, w] float32
    return z.to(dtype).contiguous()


# --- sd-scripts ---------------------------------------------------------------------------------


def _sd_scripts_name(stem: str, image_hw: tuple[int, int], family: str) -> str:
    return _size_name(stem, image_hw, SD_SCRIPTS_WRITES[family], ".npz")


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """What np.savez writes (a zip of stored .npy members), with fixed member dates so equal arrays give equal bytes."""
    with open(path, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, array in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=NPZ_DATE)
            info.external_attr = 0o600 << 16  # as np.savez's members
            with zf.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)


def _sd_scripts_content(
    latent: torch.Tensor, fmt: LatentFormat, image_hw: tuple[int, int], dtype: torch.dtype, provenance: str | None
) -> Callable[[Path], None]:
    family = fmt.family.lower()
    scaled = SD_SCRIPTS_ARCHITECTURES[SD_SCRIPTS_WRITES[family]][1]
    z = _stored(latent, fmt, scaled, dtype).numpy()  # [C, h, w] float32
    key = f"_{z.shape[1]}x{z.shape[2]}" if family in SD_SCRIPTS_MULTI[0] else ""  # multi-resolution caches: latents_{h}x{w}
    height, width = image_hw
    arrays = {
        f"latents{key}": z,
        f"original_size{key}": np.array([width, height], dtype=np.int64),  # (W, H) before resizing: the image's own
        f"crop_ltrb{key}": np.array([0, 0, width, height], dtype=np.int64),  # the whole image, nothing cropped
    }
    if provenance is not None:
        arrays[PROVENANCE_MEMBER] = np.array([provenance])  # [1] unicode: no pickle
    return lambda tmp: write_npz(tmp, arrays)


# --- musubi-tuner -------------------------------------------------------------------------------


def _musubi_name(stem: str, image_hw: tuple[int, int], family: str) -> str:
    return _size_name(stem, image_hw, MUSUBI_WRITES[family].short, ".safetensors")


def _musubi_content(
    latent: torch.Tensor, fmt: LatentFormat, image_hw: tuple[int, int], dtype: torch.dtype, provenance: str | None
) -> Callable[[Path], None]:
    arch = MUSUBI_WRITES[fmt.family.lower()]
    z = _stored(latent, fmt, True, dtype)  # [C, h, w]
    _, h, w = z.shape
    tensor = z[:, None] if arch.frame_axis else z  # [C, 1, h, w] or [C, h, w], as musubi's own writer
    key = f"latents_1x{h}x{w}_{dtype_name(dtype)}"
    height, width = image_hw
    # no frame_count: musubi writes it for videos only
    meta = {"architecture": arch.name, "width": str(width), "height": str(height), "format_version": MUSUBI_FORMAT_VERSION}
    if provenance is not None:
        meta[PROVENANCE_KEY] = provenance
    return lambda tmp: write_safetensors(tmp, {key: tensor.contiguous()}, meta)


TRAINER_FORMATS: dict[str, TrainerFormat] = {
    f.name: f
    for f in (
        TrainerFormat(
            "sd-scripts", "sd-scripts", ".npz", tuple(SD_SCRIPTS_WRITES), (torch.float32,), _sd_scripts_name, _sd_scripts_content
        ),
        TrainerFormat("musubi", "musubi-tuner", ".safetensors", tuple(MUSUBI_WRITES), MUSUBI_DTYPES, _musubi_name, _musubi_content),
    )
}


def read_provenance(path: Path) -> Any:
    """The provenance a cache vaetool wrote records (None: none), from the npz member or the safetensors header only."""
    if path.suffix != ".npz":
        _, meta = safetensors_header(path, InputError)
        text = meta.get(PROVENANCE_KEY)
    else:
        text = _npz_provenance(path)
    try:
        return None if text is None else json.loads(text)
    except ValueError:
        raise InputError("corrupt provenance (not JSON)", path) from None


def _npz_provenance(path: Path) -> str | None:
    try:
        with np.load(path, allow_pickle=False) as npz:
            if PROVENANCE_MEMBER not in npz.files:
                return None
            value = npz[PROVENANCE_MEMBER]
            return str(value[0]) if value.shape == (1,) and value.dtype.kind == "U" else "not a string"
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise InputError(f"cannot read the cache's provenance: {first_line(err)}", path) from None
