"""Configs: the allow-list, published upstream YAMLs, overrides, and every shipped config."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from vaetool.config import (
    apply_overrides,
    extract_vae_config,
    find_config_file,
    instantiate_from_config,
    load_vae_config,
    load_yaml,
    shipped_configs,
)
from vaetool.errors import ConfigError

# The v1 inference config users have from the CompVis/Stability repos (unet and cond stage left as they are:
# only the first stage is ever instantiated, so their targets need not be allowed).
V1_INFERENCE = """
model:
  base_learning_rate: 1.0e-04
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 64
    channels: 4
    scale_factor: 0.18215
    use_ema: False
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 32
        in_channels: 4
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult:
          - 1
          - 2
          - 4
          - 4
          num_res_blocks: 2
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
"""

# generative-models configs/inference/svd.yaml, first stage as published
SVD_FIRST_STAGE = """
model:
  target: sgm.models.diffusion.DiffusionEngine
  params:
    scale_factor: 0.18215
    disable_first_stage_autocast: True
    first_stage_config:
      target: sgm.models.autoencoder.AutoencodingEngine
      params:
        loss_config:
          target: torch.nn.Identity
        regularizer_config:
          target: sgm.modules.autoencoding.regularizers.DiagonalGaussianRegularizer
        encoder_config:
          target: sgm.modules.diffusionmodules.model.Encoder
          params:
            attn_type: vanilla
            double_z: True
            z_channels: 4
            resolution: 256
            in_channels: 3
            out_ch: 3
            ch: 128
            ch_mult: [1, 2, 4, 4]
            num_res_blocks: 2
            attn_resolutions: []
            dropout: 0.0
        decoder_config:
          target: sgm.modules.autoencoding.temporal_ae.VideoDecoder
          params:
            attn_type: vanilla
            double_z: True
            z_channels: 4
            resolution: 256
            in_channels: 3
            out_ch: 3
            ch: 128
            ch_mult: [1, 2, 4, 4]
            num_res_blocks: 2
            attn_resolutions: []
            dropout: 0.0
            video_kernel_size: [3, 1, 1]
"""


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize(("text", "shipped"), [(V1_INFERENCE, "sd1"), (SVD_FIRST_STAGE, "svd")], ids=["v1-inference", "svd"])
def test_published_first_stage_builds_the_shipped_modules(tmp_path: Path, text: str, shipped: str) -> None:
    path = tmp_path / "upstream.yaml"
    path.write_text(textwrap.dedent(text))
    upstream = load_vae_config(path)
    ours = load_vae_config(shipped)
    assert upstream.latent_format is not None and upstream.latent_format.scale == pytest.approx(0.18215)
    a, b = instantiate_from_config(upstream.model), instantiate_from_config(ours.model)
    assert type(a.decoder) is type(b.decoder)
    assert _shapes(a) == _shapes(b)


def test_every_shipped_config_builds_and_declares_its_latent_format() -> None:
    names = shipped_configs()
    for required in ("sd1", "sd2", "sdxl", "sd3", "flux", "svd", "svd-image-decoder", "sd-x4-upscaler", "tiny-f8"):
        assert required in names
    for name in (n for n in names if n.startswith("tiny")):
        cfg = load_vae_config(name)
        model = instantiate_from_config(cfg.model)
        assert cfg.latent_format is not None
        assert cfg.latent_format.channels == model.embed_dim


def test_unknown_target_is_refused_and_lists_the_allowed_ones() -> None:
    with pytest.raises(ConfigError) as err:
        instantiate_from_config({"target": "os.system", "params": {"command": "echo pwned"}})
    message = str(err.value)
    assert "'os.system' is not allowed" in message
    assert "ldm.models.autoencoder.AutoencoderKL" in message
    assert "\n" not in message


def test_bad_params_name_the_target() -> None:
    with pytest.raises(ConfigError, match="cannot build vaetool.AutoencoderKL"):
        instantiate_from_config({"target": "vaetool.AutoencoderKL", "params": {"embed_dim": 4}})


def test_overrides_set_dotted_keys_with_yaml_values() -> None:
    cfg = apply_overrides({"model": {"params": {"embed_dim": 4}}}, ["model.params.embed_dim=8", "model.new.flag=true"])
    assert cfg["model"]["params"]["embed_dim"] == 8
    assert cfg["model"]["new"]["flag"] is True
    with pytest.raises(ConfigError, match="not of the form"):
        apply_overrides({}, ["novalue"])


def test_bad_yaml_files_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match="missing.yaml: no such file"):
        load_yaml(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: invalid YAML"):
        load_yaml(broken)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_yaml(scalar)
    with pytest.raises(ConfigError, match="no 'target'"):
        extract_vae_config({"model": {"params": {}}}, "x.yaml")


def test_config_checks_name_the_attention_blocks_that_nn_builds() -> None:
    from vaetool.config_checks import ATTN_TYPE_NAMES
    from vaetool.nn.blocks import ATTN_TYPES

    assert sorted(ATTN_TYPE_NAMES) == sorted(ATTN_TYPES)


def test_an_unknown_name_lists_the_shipped_models_apart_from_the_training_recipes() -> None:
    with pytest.raises(ConfigError) as err:
        find_config_file("sdxxl")
    message = str(err.value)
    assert "did you mean sdxl" in message
    models, recipes = message.split("shipped models: ")[1].split("; training recipes (vaetool train): ")
    assert "sdxl" in models.split(", ") and "train-mini" not in models
    assert "train-mini" in recipes.split(", ")
