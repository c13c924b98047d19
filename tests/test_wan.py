"""Wan 2.1 / Qwen-Image VAE: parity with diffusers' AutoencoderKLWan and AutoencoderKLQwenImage at a
tiny random config (images, and videos of 1, 5 and 9 frames through the chunked causal path), the
key map both ways of detection, the latent normalisation, and named errors."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from torch import nn

from vaetool.archs import find_architecture
from vaetool.checkpoints import convert_any, load_checkpoint, load_into
from vaetool.config import instantiate_from_config
from vaetool.errors import CheckpointError, InputError
from vaetool.families import get_family
from vaetool.nn.protocol import VideoAutoencoder
from vaetool.nn.wan import WanVAE

diffusers = pytest.importorskip("diffusers")

# 3 downsamples (f8), two of them temporal (4x time), as the real VAE; 4 base channels keep it fast
KW: dict[str, Any] = {"base_dim": 4, "z_dim": 16, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1, "temperal_downsample": [False, True, True]}
CLASSES = {"AutoencoderKLWan": "wan", "AutoencoderKLQwenImage": "qwen-image"}  # diffusers class -> family


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def pairs(perturb: Callable[..., nn.Module], tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """Per diffusers class: (diffusers model, vaetool model loaded from a diffusers-layout file, family)."""
    out = {}
    for cls, family in CLASSES.items():
        torch.manual_seed(0)
        ref = perturb(getattr(diffusers, cls)(**KW))
        path = tmp_path_factory.mktemp("wan") / "vae.safetensors"
        safetensors.torch.save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
        loaded = load_checkpoint(path)
        assert loaded.layout == "diffusers"
        model = instantiate_from_config(loaded.config).eval()
        load_into(model, loaded.state_dict, path)
        out[cls] = (ref, model, family)
    return out


@pytest.fixture(scope="module")
def pair(pairs: dict[str, tuple]) -> tuple:
    return pairs["AutoencoderKLWan"]


@pytest.mark.parametrize(("cls", "frames"), [("AutoencoderKLWan", 1), ("AutoencoderKLWan", 5), ("AutoencoderKLWan", 9),
                                             ("AutoencoderKLQwenImage", 9)])
def test_video_parity(pairs: dict[str, tuple], cls: str, frames: int) -> None:
    ref, model, family = pairs[cls]
    x = torch.rand(1, 3, frames, 16, 24, generator=torch.Generator().manual_seed(frames)) * 2 - 1
    with torch.no_grad():
        post = ref.encode(x).latent_dist
        mean, logvar = model.encode_video_moments(x).chunk(2, dim=1)  # [B, 16, 1 + (T-1)/4, 2, 3] each
        assert mean.shape == (1, 16, 1 + (frames - 1) // 4, 2, 3)
        _close(mean, post.mean)
        _close(logvar.clamp(-30, 20), post.logvar)
        video = model.decode_video(post.mean)
        assert video.shape == x.shape
        _close(video, ref.decode(post.mean).sample)
    # the normalised latent, as the Wan / Qwen-Image pipelines compute it from the class's config
    shape = (1, -1, 1, 1, 1)
    expected = (post.mean - torch.tensor(ref.config.latents_mean).view(shape)) / torch.tensor(ref.config.latents_std).view(shape)
    _close(get_family(family).to_scaled(mean), expected)


@pytest.mark.parametrize("cls", list(CLASSES))
def test_image_parity_is_the_one_frame_video(pairs: dict[str, tuple], cls: str) -> None:
    ref, model, _ = pairs[cls]
    x = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        post = ref.encode(x[:, :, None]).latent_dist  # [B, 16, 1, 2, 3]
        mean, logvar = model.encode_moments(x).chunk(2, dim=1)  # [B, 16, 2, 3]
        _close(mean, post.mean[:, :, 0])
        _close(logvar.clamp(-30, 20), post.logvar[:, :, 0])
        _close(model.decode(mean), ref.decode(post.mean).sample[:, :, 0])
    assert isinstance(model, VideoAutoencoder)
    assert (model.embed_dim, model.downscale, model.time_downscale) == (16, 8, 4)


def test_frame_count_must_be_one_plus_four_k(pair: tuple) -> None:
    _, model, _ = pair
    with pytest.raises(InputError, match="1 \\+ 4k frames"):
        model.encode_video_moments(torch.zeros(1, 3, 6, 16, 16))
    with pytest.raises(InputError, match="latent videos"):
        model.decode_video(torch.zeros(1, 16, 2, 2))


def test_detection_and_original_layout(pair: tuple) -> None:
    ref, model, _ = pair
    sd = ref.state_dict()
    layout, original, config = convert_any(sd)
    assert layout == "diffusers" and find_architecture(sd).name == "wan"
    assert convert_any(original)[0] == "original" and find_architecture(original).name == "wan"
    assert original.keys() == model.state_dict().keys()
    # the names ComfyUI and the Wan repo use, with the values diffusers holds under its names
    assert torch.equal(original["decoder.middle.0.residual.0.gamma"], sd["decoder.mid_block.resnets.0.norm1.gamma"])
    assert torch.equal(original["conv1.weight"], sd["quant_conv.weight"])
    assert torch.equal(original["decoder.upsamples.5.resample.1.weight"], sd["decoder.up_blocks.1.upsamplers.0.resample.1.weight"])
    assert torch.equal(original["decoder.upsamples.3.shortcut.weight"], sd["decoder.up_blocks.1.resnets.0.conv_shortcut.weight"])
    assert config == {"target": "vaetool.WanVAE", "params": {
        "dim": 4, "z_dim": 16, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1, "temperal_downsample": [False, True, True],
        "in_channels": 3, "out_channels": 3}}


def test_original_layout_file_loads(pair: tuple, tmp_path: Path) -> None:
    ref, _, _ = pair
    _, original, _ = convert_any(ref.state_dict())
    path = tmp_path / "wan_2.1_vae.safetensors"
    safetensors.torch.save_file({f"vae.{k}": v.contiguous() for k, v in original.items()}, str(path))
    loaded = load_checkpoint(path)
    assert (loaded.layout, loaded.prefix) == ("original", "vae.")
    assert all(torch.equal(loaded.state_dict[k], v) for k, v in original.items())


def test_missing_and_mixed_keys_are_named_errors(pair: tuple, tmp_path: Path) -> None:
    ref, _, _ = pair
    _, original, _ = convert_any(ref.state_dict())
    path = tmp_path / "cut.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in original.items() if k != "decoder.middle.1.proj.bias"}, str(path))
    loaded = load_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"1 missing \(decoder\.middle\.1\.proj\.bias\)") as err:
        load_into(instantiate_from_config(loaded.config), loaded.state_dict, path)
    assert str(err.value).startswith(str(path))
    with pytest.raises(CheckpointError, match="conv2.weight is missing"):
        convert_any({k: v for k, v in original.items() if not k.startswith("conv2.")})
    with pytest.raises(CheckpointError, match="both diffusers and original"):
        convert_any(ref.state_dict() | {"decoder.head.0.gamma": original["decoder.head.0.gamma"]})
    with pytest.raises(CheckpointError, match="1 Wan diffusers key"):
        convert_any(ref.state_dict() | {"decoder.up_blocks.0.resnets.0.extra.weight": torch.zeros(1)})


def test_latent_statistics_are_diffusers_defaults() -> None:
    for cls, family in CLASSES.items():
        params = inspect.signature(getattr(diffusers, cls).__init__).parameters
        fmt = get_family(family)
        assert list(fmt.mean) == params["latents_mean"].default
        assert list(fmt.std) == params["latents_std"].default


def test_shipped_config_is_the_published_architecture() -> None:
    from vaetool.config import load_vae_config

    model = instantiate_from_config(load_vae_config("wan").model)
    assert isinstance(model, WanVAE)
    assert sum(p.numel() for p in model.parameters()) == 126_892_531  # Wan2.1_VAE.pth
