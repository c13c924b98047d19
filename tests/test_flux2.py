"""Flux.2 VAE: parity with diffusers' AutoencoderKLFlux2 at a tiny random config (posterior, decode,
raw 32-channel and patchified, BatchNorm-normalised 128-channel latents), key map and detection in
both layouts, and named errors."""

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
from vaetool.errors import CheckpointError
from vaetool.families import bind_statistics, get_family
from vaetool.nn.flux2 import Flux2Autoencoder
from vaetool.nn.protocol import LatentAutoencoder

diffusers = pytest.importorskip("diffusers")

KW = {"block_out_channels": (32, 64), "layers_per_block": 1, "latent_channels": 32,
      "down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2}


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def ref(perturb: Callable[..., nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    model = perturb(diffusers.AutoencoderKLFlux2(**KW))
    gen = torch.Generator().manual_seed(5)
    model.bn.running_mean.copy_(torch.randn(128, generator=gen))
    model.bn.running_var.copy_(torch.rand(128, generator=gen) + 0.5)
    model.bn.num_batches_tracked.fill_(1234)
    return model


@pytest.fixture(scope="module")
def model(ref: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Flux2Autoencoder:
    path = tmp_path_factory.mktemp("flux2") / "diffusion_pytorch_model.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    loaded = load_checkpoint(path)
    assert loaded.layout == "diffusers"
    built = instantiate_from_config(loaded.config).eval()
    load_into(built, loaded.state_dict, path)
    return built


def _patchify_as_the_pipeline(z: torch.Tensor) -> torch.Tensor:
    """diffusers' Flux2Pipeline._patchify_latents (its module needs transformers, so restated here)."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def test_parity_posterior_decode_and_latent_forms(ref: nn.Module, model: Flux2Autoencoder) -> None:
    x = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        post = ref.encode(x).latent_dist
        mean, logvar = model.encode_moments(x).chunk(2, dim=1)  # raw: [B, 32, 8, 12] each
        assert mean.shape == (2, 32, 8, 12)
        _close(mean, post.mean)
        _close(logvar.clamp(-30, 20), post.logvar)
        _close(model.decode(post.mean), ref.decode(post.mean).sample)
    # the patchified, normalised 128-channel latent, as Flux2Pipeline computes it from `bn`
    fmt = bind_statistics(get_family("flux2"), model)
    bn_std = torch.sqrt(ref.bn.running_var.view(1, -1, 1, 1) + ref.config.batch_norm_eps)
    expected = (_patchify_as_the_pipeline(post.mean) - ref.bn.running_mean.view(1, -1, 1, 1)) / bn_std
    scaled = fmt.to_scaled(mean)
    assert scaled.shape == (2, 128, 4, 6)
    _close(scaled, expected)
    _close(fmt.to_raw(scaled), mean)
    with torch.no_grad():
        _close(model.decode(fmt.to_raw(expected)), ref.decode(post.mean).sample)
    assert isinstance(model, LatentAutoencoder) and (model.embed_dim, model.downscale) == (32, 2)


def test_unbound_statistics_are_an_error(model: Flux2Autoencoder) -> None:
    with pytest.raises(ValueError, match="takes its mean/std from the checkpoint"):
        get_family("flux2").to_scaled(torch.zeros(1, 32, 4, 4))
    with pytest.raises(ValueError, match="needs statistics from the model"):
        bind_statistics(get_family("flux2"), nn.Linear(1, 1))


def test_detection_and_original_layout(ref: nn.Module, model: Flux2Autoencoder) -> None:
    sd = ref.state_dict()
    layout, original, config = convert_any(sd)
    assert layout == "diffusers" and find_architecture(sd).name == "flux2"
    assert convert_any(original)[0] == "original" and find_architecture(original).name == "flux2"
    assert original.keys() == model.state_dict().keys()
    # Black Forest Labs' names: quant convs inside the coders; the BatchNorm counter is dropped
    assert torch.equal(original["encoder.quant_conv.weight"], sd["quant_conv.weight"])
    assert torch.equal(original["decoder.post_quant_conv.bias"], sd["post_quant_conv.bias"])
    assert torch.equal(original["bn.running_var"], sd["bn.running_var"])
    assert "bn.num_batches_tracked" not in original and "quant_conv.weight" not in original
    assert original["decoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    p = config["params"]
    assert (config["target"], p["patch_size"], p["bn_eps"]) == ("vaetool.Flux2Autoencoder", 2, 1e-4)
    assert p["encoder_config"]["params"]["ch_mult"] == [1, 2] and p["decoder_config"]["target"] == "vaetool.Flux2Decoder"
    info = describe(sd)
    assert (info["architecture"], info["scaled_channels"], info["scaled_downscale"]) == ("flux2", 128, 4)
    assert info["candidate_families"] == [] and info["parameters"] == sum(v.numel() for v in sd.values())


def test_original_file_loads_and_missing_keys_are_named(ref: nn.Module, tmp_path: Path) -> None:
    _, original, _ = convert_any(ref.state_dict())
    path = tmp_path / "flux2-vae.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in original.items()}, str(path))
    assert load_checkpoint(path).layout == "original"
    cut = tmp_path / "cut.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in original.items() if k != "decoder.up.1.block.0.conv2.bias"}, str(cut))
    loaded = load_checkpoint(cut)
    with pytest.raises(CheckpointError, match=r"1 missing \(decoder\.up\.1\.block\.0\.conv2\.bias\)"):
        load_into(instantiate_from_config(loaded.config), loaded.state_dict, cut)
    with pytest.raises(CheckpointError, match="bn.running_var is missing"):
        convert_any({k: v for k, v in original.items() if k != "bn.running_var"})
    with pytest.raises(CheckpointError, match=r"unexpected Flux\.2 BatchNorm key\(s\) bn\.weight"):
        convert_any(original | {"bn.weight": torch.ones(128)})
    with pytest.raises(CheckpointError, match="needs encoder.quant_conv"):
        convert_any({k: v for k, v in original.items() if not k.startswith("encoder.quant_conv")})


def test_shipped_config_matches_the_published_architecture() -> None:
    ours = instantiate_from_config(load_vae_config("flux2").model)
    theirs = diffusers.AutoencoderKLFlux2()  # the defaults are FLUX.2's VAE
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    assert ours.bn.running_mean.shape == theirs.bn.running_mean.shape == (128,)
