"""TAESD (taesd, taesdxl, taesd3, taef1): parity with diffusers' AutoencoderTiny at a tiny random config
(4 and 16 channels), the parent-family latent form at the boundary, key map and detection in both
layouts, and named errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

from vaetool.archs import find_architecture
from vaetool.checkpoints import convert_any, describe, load_checkpoint, load_into
from vaetool.config import instantiate_from_config, load_vae_config
from vaetool.errors import CheckpointError, ConfigError
from vaetool.families import get_family
from vaetool.nn.protocol import LatentAutoencoder
from vaetool.nn.taesd import DETERMINISTIC_LOGVAR, TAESD

diffusers = pytest.importorskip("diffusers")

FAMILY_OF = {4: "sd1", 16: "flux"}  # latent channels -> the parent family used for each case


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@pytest.fixture(scope="module", params=[4, 16])
def pair(request: pytest.FixtureRequest, perturb: Callable[..., nn.Module], tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """(diffusers AutoencoderTiny with the published block counts at 8 channels, vaetool TAESD from its file)."""
    torch.manual_seed(0)
    ref = perturb(diffusers.AutoencoderTiny(
        encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4, latent_channels=request.param))
    path = tmp_path_factory.mktemp("taesd") / "diffusion_pytorch_model.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    loaded = load_checkpoint(path)
    assert loaded.layout == "diffusers" and loaded.config["params"]["family"] is None  # keys cannot tell it
    config = loaded.config | {"params": loaded.config["params"] | {"family": FAMILY_OF[request.param]}}
    model = instantiate_from_config(config).eval()
    load_into(model, loaded.state_dict, path)
    return ref, model


def test_encode_parity_in_the_parent_raw_space(pair: tuple) -> None:
    ref, model = pair
    fmt = get_family(model.parent.family)
    x = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        native = ref.encode(x).latents  # TAESD's own space: the parent family's scaled latents
        mean, logvar = model.encode_moments(x).chunk(2, dim=1)
    assert mean.shape == native.shape == (2, fmt.channels, 2, 3)
    _close(mean, fmt.to_raw(native))
    _close(fmt.to_scaled(mean), native)
    assert torch.all(logvar == DETERMINISTIC_LOGVAR)


def test_decode_parity(pair: tuple) -> None:
    ref, model = pair
    fmt = get_family(model.parent.family)
    scaled = torch.randn(2, fmt.channels, 2, 3, generator=torch.Generator().manual_seed(2)) * 2
    with torch.no_grad():
        _close(model.decode(fmt.to_raw(scaled)), ref.decode(scaled).sample)
    assert isinstance(model, LatentAutoencoder) and model.downscale == 8


def test_detection_and_original_layout(pair: tuple) -> None:
    ref, model = pair
    sd = ref.state_dict()
    layout, original, config = convert_any(sd)
    assert layout == "diffusers" and find_architecture(sd).name == "taesd"
    assert convert_any(original)[0] == "original" and find_architecture(original).name == "taesd"
    assert original.keys() == model.state_dict().keys()
    # madebyollin's Sequential indices: the decoder's 0 is the parameter-free Clamp
    assert torch.equal(original["decoder.1.weight"], sd["decoder.layers.0.weight"])
    assert torch.equal(original["encoder.1.conv.4.weight"], sd["encoder.layers.1.conv.4.weight"])
    assert config["params"] | {"family": "x"} == {"latent_channels": model.embed_dim, "channels": 8, "encoder_blocks": [1, 3, 3, 3],
                                                  "decoder_blocks": [3, 3, 3, 1], "family": "x"}
    info = describe(sd)
    assert info["architecture"] == "taesd"
    assert info["candidate_families"] == (["sd1", "sd2", "sdxl"] if model.embed_dim == 4 else ["sd3", "flux"])


def test_a_taesd_without_family_refuses_to_code(pair: tuple) -> None:
    ref, _ = pair
    _, original, config = convert_any(ref.state_dict())
    model = instantiate_from_config(config)
    load_into(model, original)  # weights load (for `vaetool info`), but no latent is produced
    with pytest.raises(ConfigError, match="does not know its family"):
        model.decode(torch.zeros(1, model.embed_dim, 2, 2))
    with pytest.raises(ConfigError, match="does not know its family"):
        model.encode_moments(torch.zeros(1, 3, 16, 16))


def test_errors_are_named(pair: tuple, tmp_path: Path) -> None:
    ref, _ = pair
    _, original, _ = convert_any(ref.state_dict())
    path = tmp_path / "taesd.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in original.items() if k != "decoder.8.conv.2.bias"}, str(path))
    loaded = load_checkpoint(path)
    assert loaded.layout == "original"
    with pytest.raises(CheckpointError, match=r"1 missing \(decoder\.8\.conv\.2\.bias\)"):
        load_into(instantiate_from_config(loaded.config), loaded.state_dict, path)
    with pytest.raises(CheckpointError, match="both diffusers and original"):
        convert_any(ref.state_dict() | {"decoder.1.weight": original["decoder.1.weight"]})
    with pytest.raises(ConfigError, match="sdxl TAESD has 4 latent channels, not 16"):
        TAESD(latent_channels=16, family="sdxl")
    with pytest.raises(ConfigError, match="not one of"):
        TAESD(family="wan")


@pytest.mark.parametrize(
    ("name", "family", "channels"), [("taesd", "sd1", 4), ("taesdxl", "sdxl", 4), ("taesd3", "sd3", 16), ("taef1", "flux", 16)]
)
def test_shipped_configs_match_the_published_architecture(name: str, family: str, channels: int) -> None:
    cfg = load_vae_config(name)
    ours = instantiate_from_config(cfg.model)
    theirs = diffusers.AutoencoderTiny(latent_channels=channels)  # the defaults are madebyollin's TAESD
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    assert cfg.latent_format == get_family(family) and ours.parent == get_family(family)
