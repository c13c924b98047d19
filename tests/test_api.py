"""The Python API is as safe as the commands: padding and cropping, clamping, file helpers, no made-up weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vaetool.api import load_image, load_vae, save_image
from vaetool.errors import UsageError
from vaetool.io.images import pad_to_multiple


def test_encode_pads_like_the_commands_and_decode_crops_back() -> None:
    vae = load_vae("tiny-f8")
    image = torch.rand(1, 3, 170, 99) * 2 - 1
    latents = vae.encode(image)
    assert latents.shape == (1, 4, 22, 13)  # ceil(170/8), ceil(99/8): nothing cut off
    padded, _ = pad_to_multiple(image, 8)
    assert torch.equal(latents, vae.encode(padded))  # the same replicate padding as `vaetool encode`
    assert vae.decode(latents).shape == (1, 3, 176, 104)
    assert vae.decode(latents, size=(170, 99)).shape == (1, 3, 170, 99)


def test_decode_clamps_unless_asked_not_to() -> None:
    vae = load_vae("tiny-f8")
    z = torch.randn(1, 4, 4, 4) * 50  # random weights on large latents: values far outside [-1, 1]
    raw = vae.decode(z, clamp=False)  # the raw decode, as diffusers returns it
    assert raw.abs().max() > 1
    assert torch.equal(vae.decode(z), raw.clamp(-1, 1))


def test_load_and_save_image_round_trip(tmp_path: Path) -> None:
    image = torch.linspace(-1, 1, 3 * 8 * 5).reshape(3, 8, 5)
    path = save_image(image[None], tmp_path / "sub" / "a.png", bits=16)
    back = load_image(path)
    assert back.shape == (3, 8, 5) and (back - image).abs().max() < 1e-4


def test_a_real_config_without_weights_is_refused() -> None:
    with pytest.raises(UsageError, match="sd1: no weights.*--checkpoint.*random_weights=True"):
        load_vae("sd1")
    with pytest.warns(UserWarning, match="random weights"):
        vae = load_vae("sd1", random_weights=True)
    assert vae.source["random_weights"] is True
