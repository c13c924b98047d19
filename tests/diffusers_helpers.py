"""Tiny random diffusers VAEs, saved with `save_pretrained` as the folders users download (diffusers-folder and hub tests)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn


def perturbed(model: nn.Module, seed: int = 0) -> nn.Module:
    """Break the symmetry of default inits (norm weights 1, zeroed temporal layers) so wrong groups or keys show."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def kl(**kw: Any) -> nn.Module:
    """A diffusers AutoencoderKL with `block_out_channels` levels of plain encoder/decoder blocks."""
    import diffusers

    levels = len(kw.get("block_out_channels", (32, 64)))
    kw = {"block_out_channels": (32, 64), "layers_per_block": 1, "norm_num_groups": 16, "latent_channels": 4} | kw
    torch.manual_seed(0)
    return perturbed(diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * levels,
                                             up_block_types=("UpDecoderBlock2D",) * levels, **kw))


def temporal(**kw: Any) -> nn.Module:
    """A diffusers AutoencoderKLTemporalDecoder (SVD's VAE) with live temporal layers."""
    import diffusers

    kw = {"block_out_channels": (32, 64), "layers_per_block": 2} | kw
    torch.manual_seed(0)
    levels = len(kw["block_out_channels"])
    return perturbed(diffusers.AutoencoderKLTemporalDecoder(down_block_types=("DownEncoderBlock2D",) * levels, **kw))


def save(model: nn.Module, folder: Path, **save_kw: Any) -> Path:
    """`model.save_pretrained(folder)`; the folder."""
    model.save_pretrained(folder, **save_kw)
    return folder


def edit_config(folder: Path, **changes: Any) -> Path:
    """Change (None: remove) keys of folder/config.json; the folder."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))
    return folder


def rgb(path: Path, w: int, h: int, seed: int = 0) -> Path:
    """A random 8-bit RGB PNG."""
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path
