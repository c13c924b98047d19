"""Training images: folders read once into memory, random crops with flips and colour jitter per step."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from vaetool.errors import InputError
from vaetool.io.images import IMAGE_SUFFIXES, load_image, to_uint8
from vaetool.train.settings import DataSettings

Warn = Callable[[str], None]


def list_images(folders: Sequence[str]) -> list[Path]:
    """Every image file under the folders (recursive, sorted); a missing folder is an InputError."""
    files: list[Path] = []
    for folder in folders:
        root = Path(folder)
        if not root.is_dir():
            raise InputError("no such folder", root)
        files += sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return files


def load_folder_images(folders: Sequence[str], min_size: int, warn: Warn) -> list[torch.Tensor]:
    """Read every image; unreadable or too small ones are skipped and named through `warn`."""
    files = list_images(folders)
    if not files:
        raise InputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found", ", ".join(folders))
    images = []
    for path in files:
        try:
            img = torch.from_numpy(to_uint8(load_image(path))).permute(2, 0, 1).contiguous()  # [3, H, W] uint8
        except InputError as err:
            warn(f"skipped {err}")
            continue
        if min(img.shape[1:]) < min_size:
            warn(f"skipped {path}: smaller than {min_size} px")
            continue
        images.append(img)
    if not images:
        raise InputError("none of the images could be used", ", ".join(folders))
    return images


GRAY_WEIGHTS = torch.tensor([0.299, 0.587, 0.114])  # ITU-R 601 luma, as Pillow's convert("L")


def to_unit(img: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float in [-1, 1]."""
    return img.float() / 127.5 - 1.0


def _jitter(x: torch.Tensor, amount: float, gen: torch.Generator) -> torch.Tensor:
    """Random brightness and saturation change of up to `amount` on an image in [-1, 1]."""
    b, s = ((torch.rand(2, generator=gen) * 2 - 1) * amount + 1).tolist()
    gray = x.mean(dim=0, keepdim=True)  # [1, H, W]
    x = gray + (x - gray) * s
    return ((x + 1) * b - 1).clamp(-1, 1)


def random_batch(images: list[torch.Tensor], data: DataSettings, step: int, seed: int) -> torch.Tensor:
    """The batch of training step `step`: [B, 3, crop, crop] in [-1, 1], a pure function of (seed, step)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    crops = []
    for _ in range(data.batch_size):
        img = images[int(torch.randint(len(images), (1,), generator=gen))]
        h, w = img.shape[1:]
        lo = max(data.scale[0], data.crop / min(h, w))
        scale = lo + float(torch.rand(1, generator=gen)) * max(data.scale[1] - lo, 0.0)
        ch = min(h, math.ceil(data.crop / scale))  # source window that becomes one crop
        y = int(torch.randint(h - ch + 1, (1,), generator=gen))
        x = int(torch.randint(w - ch + 1, (1,), generator=gen))
        patch = to_unit(img[:, y : y + ch, x : x + ch])[None]  # [1, 3, ch, ch]
        if ch != data.crop:
            patch = F.interpolate(patch, size=(data.crop, data.crop), mode="bicubic", antialias=True).clamp(-1, 1)
        patch = patch[0]
        if data.flip and torch.rand(1, generator=gen) < 0.5:
            patch = patch.flip(-1)
        if data.rot90:
            patch = torch.rot90(patch, int(torch.randint(4, (1,), generator=gen)), dims=(1, 2))
        if data.color_jitter > 0:
            patch = _jitter(patch, data.color_jitter, gen)
        if data.channel_shuffle > 0 and float(torch.rand(1, generator=gen)) < data.channel_shuffle:
            patch = patch[torch.randperm(3, generator=gen)]
        if data.grayscale > 0 and float(torch.rand(1, generator=gen)) < data.grayscale:
            patch = (patch * GRAY_WEIGHTS[:, None, None]).sum(0, keepdim=True).expand(3, -1, -1)  # [3, crop, crop], R = G = B
        crops.append(patch)
    return torch.stack(crops)  # [B, 3, crop, crop]


def center_crop(img: torch.Tensor, size: int, multiple: int = 8) -> torch.Tensor:
    """The centre of a uint8 [3, H, W] image, at most size x size, sides rounded down to `multiple`."""
    h, w = img.shape[1:]
    th, tw = (min(size, h) // multiple) * multiple, (min(size, w) // multiple) * multiple
    y, x = (h - th) // 2, (w - tw) // 2
    return img[:, y : y + th, x : x + tw]
