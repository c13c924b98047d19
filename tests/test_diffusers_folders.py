"""diffusers model folders: `--checkpoint DIR` and load_vae(checkpoint=DIR) honour config.json, and match diffusers.

Folders are written by diffusers' own `save_pretrained` (tiny random models); outputs are compared
with diffusers' encode/decode at 1e-4 in fp32.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from diffusers_helpers import edit_config, kl, rgb, save, temporal

from vaetool.api import load_vae
from vaetool.cli import app
from vaetool.diffusers_config import latent_format, read_config
from vaetool.errors import CheckpointError, ConfigError, UsageError
from vaetool.families import FAMILIES
from vaetool.io.images import load_image
from vaetool.io.latents import load_latents, save_latent

diffusers = pytest.importorskip("diffusers")

CPU = ["--device", "cpu", "--quiet"]
TOL = 1e-4
# name -> (model maker, kwargs): GroupNorm groups 16 and 32, with and without quant convs, the SVD decoder
MODELS: dict[str, tuple[Any, dict[str, Any]]] = {
    "kl-16-groups": (kl, {"block_out_channels": (32, 64), "norm_num_groups": 16}),
    "kl-32-groups-no-quant-convs": (kl, {"block_out_channels": (32, 64), "norm_num_groups": 32, "latent_channels": 16,
                                         "use_quant_conv": False, "use_post_quant_conv": False}),
    "temporal": (temporal, {}),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[torch.nn.Module, Path]]:
    """name -> (diffusers model, the folder save_pretrained wrote)."""
    root = tmp_path_factory.mktemp("diffusers")
    out = {}
    for name, (make, kw) in MODELS.items():
        model = make(**kw)
        out[name] = (model, save(model, root / name))
    return out


def _copy(folder: Path, dest: Path) -> Path:
    shutil.copytree(folder, dest)
    return dest


# ---------------------------------------------------------------- parity through the CLI


@pytest.mark.parametrize("name", list(MODELS))
def test_cli_encode_matches_diffusers(runner, tmp_path: Path, folders, name: str) -> None:
    ref, folder = folders[name]
    image = rgb(tmp_path / "in" / "a.png", 40, 24, seed=1)
    result = runner.invoke(app, ["encode", str(image), "-o", str(tmp_path / "out"), "--checkpoint", str(folder), *CPU])
    assert result.exit_code == 0, result.output
    (item,) = load_latents(tmp_path / "out" / "a.safetensors")
    with torch.no_grad():
        expected = ref.encode(load_image(image)[None]).latent_dist.mean[0]  # [C, h, w]
    torch.testing.assert_close(item.latent, expected, atol=TOL, rtol=0)
    assert item.metadata["checkpoint_sha256"]


@pytest.mark.parametrize("name", list(MODELS))
def test_cli_decode_matches_diffusers(runner, tmp_path: Path, folders, name: str) -> None:
    ref, folder = folders[name]
    channels = ref.config.latent_channels
    z = torch.randn((channels, 3, 5), generator=torch.Generator().manual_seed(2))  # [C, h, w]
    save_latent(tmp_path / "lat" / "z.safetensors", z, {"latent_format": "raw"})
    args = ["decode", str(tmp_path / "lat"), "-o", str(tmp_path / "out"), "--checkpoint", str(folder), "--16bit", "-b", "1", *CPU]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    decoded = load_image(tmp_path / "out" / "z.png")  # [3, H, W], 16-bit: steps of 2/65535
    with torch.no_grad():
        kwargs = {"num_frames": 1} if name == "temporal" else {}
        expected = ref.decode(z[None], **kwargs).sample[0].clamp(-1, 1)  # [3, H, W]
    torch.testing.assert_close(decoded, expected, atol=TOL, rtol=0)


def test_norm_groups_come_from_config_json(folders) -> None:
    """The weights file alone loads with SD's 32 groups and decodes wrong: the config.json is what makes it right."""
    ref, folder = folders["kl-16-groups"]
    z = torch.randn((1, 4, 3, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ref.decode(z).sample
        right = load_vae(checkpoint=folder).decode(z, clamp=False)
        wrong = load_vae(checkpoint=folder / "diffusion_pytorch_model.safetensors").decode(z, clamp=False)
    torch.testing.assert_close(right, expected, atol=TOL, rtol=0)
    assert (wrong - expected).abs().max() > 1e-2


def test_temporal_clip_matches_diffusers(folders) -> None:
    ref, folder = folders["temporal"]
    vae = load_vae(checkpoint=folder)
    assert vae.source["class"] == "AutoencoderKLTemporalDecoder"
    assert vae.latent_format.scale == 0.18215 and vae.downscale == 2  # a tiny f2 model: no known family has f2 latents
    z = torch.randn((3, 4, 3, 5), generator=torch.Generator().manual_seed(4))  # 3 frames
    with torch.no_grad():
        torch.testing.assert_close(vae.decode(z, timesteps=3, clamp=False), ref.decode(z, num_frames=3).sample, atol=TOL, rtol=0)


# ---------------------------------------------------------------- layouts: pipelines, subfolders, variants, .bin


def test_pipeline_folder_uses_vae_and_subfolder_picks_another(tmp_path: Path, folders) -> None:
    (ref, folder), (other, other_folder) = folders["kl-16-groups"], folders["kl-32-groups-no-quant-convs"]
    pipe = tmp_path / "pipe"
    _copy(folder, pipe / "vae")
    _copy(other_folder, pipe / "vae_alt")
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", "vae": ["diffusers", "AutoencoderKL"]}))
    (pipe / "unet").mkdir()
    (pipe / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    z4 = torch.randn((1, 4, 3, 5), generator=torch.Generator().manual_seed(5))
    z16 = torch.randn((1, 16, 3, 5), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        vae = load_vae(checkpoint=pipe)
        assert vae.source["subfolder"] == "vae"
        torch.testing.assert_close(vae.decode(z4, clamp=False), ref.decode(z4).sample, atol=TOL, rtol=0)
        alt = load_vae(checkpoint=pipe, subfolder="vae_alt")
        torch.testing.assert_close(alt.decode(z16, clamp=False), other.decode(z16).sample, atol=TOL, rtol=0)
    with pytest.raises(ConfigError, match=r"describes a UNet2DConditionModel, not a VAE"):
        load_vae(checkpoint=pipe, subfolder="unet")
    with pytest.raises(CheckpointError, match=r"no text_encoder/config\.json \(the --subfolder given\)"):
        load_vae(checkpoint=pipe, subfolder="text_encoder")
    shutil.rmtree(pipe / "vae")
    with pytest.raises(CheckpointError, match="a pipeline folder without vae/config.json"):
        load_vae(checkpoint=pipe)


@pytest.mark.parametrize("kind", ["fp16-variant", "bin", "bin-fp16-variant"])
def test_bin_and_fp16_variant_weights(tmp_path: Path, folders, kind: str) -> None:
    model = kl(block_out_channels=(32, 64), norm_num_groups=16)
    save_kw = {"fp16-variant": {"variant": "fp16"}, "bin": {"safe_serialization": False},
               "bin-fp16-variant": {"variant": "fp16", "safe_serialization": False}}[kind]
    if "fp16" in kind:
        model = model.half()
    folder = save(model, tmp_path / kind, **save_kw)
    expected_name = {"fp16-variant": "diffusion_pytorch_model.fp16.safetensors", "bin": "diffusion_pytorch_model.bin",
                     "bin-fp16-variant": "diffusion_pytorch_model.fp16.bin"}[kind]
    assert (folder / expected_name).exists()
    vae = load_vae(checkpoint=folder)
    assert Path(vae.source["checkpoint"]).name == expected_name
    z = torch.randn((1, 4, 3, 5), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        reference = kl(block_out_channels=(32, 64), norm_num_groups=16)
        if "fp16" in kind:  # the file holds fp16 weights: compare with diffusers running the same rounded weights
            reference.load_state_dict({k: v.half().float() for k, v in reference.state_dict().items()})
        torch.testing.assert_close(vae.decode(z, clamp=False), reference.decode(z).sample, atol=TOL, rtol=0)


def test_full_precision_weights_win_over_the_fp16_variant(tmp_path: Path, folders) -> None:
    _, folder = folders["kl-16-groups"]
    both = _copy(folder, tmp_path / "both")
    safetensors.torch.save_file({"x": torch.zeros(1)}, both / "diffusion_pytorch_model.fp16.safetensors")  # would not load
    assert Path(load_vae(checkpoint=both).source["checkpoint"]).name == "diffusion_pytorch_model.safetensors"


# ---------------------------------------------------------------- the latent format from config.json


def _format(tmp_path: Path, **config: Any):
    path = tmp_path / "config.json"
    levels = len(config.get("block_out_channels", [32] * 4))
    types = {"block_out_channels": [32] * 4, "down_block_types": ["DownEncoderBlock2D"] * levels,
             "up_block_types": ["UpDecoderBlock2D"] * levels}
    path.write_text(json.dumps({"_class_name": "AutoencoderKL"} | types | config))
    return latent_format(read_config(path))


@pytest.mark.parametrize(("config", "family"), [
    ({"scaling_factor": 0.18215}, "sd1"),  # sd1 and sd2 share one VAE and format
    ({"scaling_factor": 0.13025}, "sdxl"),
    ({"scaling_factor": 1.5305, "shift_factor": 0.0609, "latent_channels": 16}, "sd3"),
    ({"scaling_factor": 0.3611, "shift_factor": 0.1159, "latent_channels": 16}, "flux"),
    ({"scaling_factor": 0.08333, "block_out_channels": [32] * 3}, "sd-x4-upscaler"),
    ({"_class_name": "AutoencoderKLTemporalDecoder", "scaling_factor": 0.18215}, "svd"),
    ({"scaling_factor": 0.5}, "custom"),
    ({"scaling_factor": 0.13025, "latent_channels": 16}, "custom"),
])  # fmt: skip
def test_factors_map_to_known_families(tmp_path: Path, config: dict[str, Any], family: str) -> None:
    fmt = _format(tmp_path, **config)
    assert fmt.family == family
    if family != "custom":
        assert fmt == FAMILIES[family]
    else:
        assert (fmt.scale, fmt.shift) == (config["scaling_factor"], 0.0)


def test_family_option_must_agree_with_config_json(tmp_path: Path) -> None:
    folder = save(kl(block_out_channels=(32, 32, 32, 32), scaling_factor=0.18215), tmp_path / "sd")
    assert load_vae(checkpoint=folder).latent_format.family == "sd1"
    assert load_vae(checkpoint=folder, family="sd2").latent_format.family == "sd2"  # same numbers: names it
    with pytest.raises(ConfigError, match=r"--family sdxl scales by 0\.13025.*config declares 0\.18215"):
        load_vae(checkpoint=folder, family="sdxl")


def test_latents_mean_and_std_give_a_per_channel_format(runner, tmp_path: Path) -> None:
    mean, std = [0.5, -1.0, 0.25, 2.0], [2.0, 4.0, 0.5, 1.0]
    folder = save(kl(block_out_channels=(32, 32), scaling_factor=0.5, latents_mean=mean, latents_std=std), tmp_path / "pg")
    vae = load_vae(checkpoint=folder)
    fmt = vae.latent_format
    assert fmt.scale == 0.5 and fmt.shift == 0.0 and fmt.mean == tuple(mean) and fmt.std == tuple(std)
    image = rgb(tmp_path / "in" / "a.png", 24, 16)
    result = runner.invoke(app, ["encode", str(image), "-o", str(tmp_path / "lat"), "--checkpoint", str(folder), "--scaled", *CPU])
    assert result.exit_code == 0, result.output
    (item,) = load_latents(tmp_path / "lat" / "a.safetensors")
    raw = vae.encode(load_image(image)[None])[0]  # [4, h, w]
    per_channel = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
    torch.testing.assert_close(item.latent, (raw - per_channel[0]) * 0.5 / per_channel[1], atol=TOL, rtol=0)  # diffusers' formula
    # decoding the scaled file undoes the per-channel scaling the file records
    args = ["decode", str(tmp_path / "lat"), "-o", str(tmp_path / "png"), "--checkpoint", str(folder), "--16bit", *CPU]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    torch.testing.assert_close(load_image(tmp_path / "png" / "a.png"), vae.decode(raw[None])[0].clamp(-1, 1), atol=TOL, rtol=0)
    save_latent(tmp_path / "bad" / "b.safetensors", item.latent, {"scaled": True, "scale": 0.5, "mean": [0.0, 1.0], "std": [1.0, 1.0]})
    args = ["decode", str(tmp_path / "bad"), "-o", str(tmp_path / "png"), "--checkpoint", str(folder), *CPU]
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "bad recorded latent form (scale 0.5, shift None)" in result.stderr and "2 means" in result.stderr


@pytest.mark.parametrize(("config", "message"), [
    ({"latents_mean": [0.0] * 4}, "gives latents_mean without latents_std"),
    ({"latents_mean": [0.0] * 3, "latents_std": [1.0] * 3}, "latents_mean has 3 values for latent_channels 4"),
    ({"latents_mean": [0.0] * 4, "latents_std": [1.0, 0.0, 1.0, 1.0]}, "latents_std must be positive"),
    ({"latents_mean": [0.0] * 4, "latents_std": [1.0] * 4, "shift_factor": 0.1}, "both shift_factor and latents_mean"),
    ({"scaling_factor": "0.18215"}, "scaling_factor must be a number"),
])  # fmt: skip
def test_bad_latent_factors(tmp_path: Path, config: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _format(tmp_path, **config)


# ---------------------------------------------------------------- force_upcast


@pytest.mark.parametrize("upcast", [True, False])
def test_force_upcast_runs_fp16_requests_in_fp32_with_a_note(runner, tmp_path: Path, folders, upcast: bool) -> None:
    folder = edit_config(_copy(folders["kl-16-groups"][1], tmp_path / "vae"), force_upcast=upcast)
    image = rgb(tmp_path / "in" / "a.png", 16, 16)
    args = ["encode", str(image), "-o", str(tmp_path / "out"), "--checkpoint", str(folder), "--dtype", "fp16", "--json", "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["dtype"] == ("float32" if upcast else "float16")
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: ")]
    assert notes == ([f"note: {folder / 'config.json'}: config.json sets force_upcast (this VAE overflows in fp16), so it runs "
                      "in fp32, not fp16"] if upcast else [])
    assert load_vae(checkpoint=folder, dtype=torch.bfloat16).dtype == torch.bfloat16  # bf16 has fp32's range: kept


# ---------------------------------------------------------------- config.json against the weights


@pytest.mark.parametrize(("change", "message"), [
    ({"block_out_channels": [32, 32]}, r"block_out_channels is \[32, 32\] in config\.json but \[32, 64\] in the weights"),
    ({"latent_channels": 8}, "latent_channels is 8 in config.json but 4 in the weights"),
    ({"layers_per_block": 2}, "layers_per_block is 2 in config.json but 1 in the weights"),
    ({"use_quant_conv": False}, "use_quant_conv is False in config.json but True in the weights"),
    ({"mid_block_add_attention": False}, "mid_block_add_attention is False in config.json but True in the weights"),
    ({"out_channels": 4}, "out_channels is 4 in config.json but 3 in the weights"),
    ({"_class_name": "AutoencoderKLTemporalDecoder"}, "the decoder is temporal in config.json but image in the weights"),
])  # fmt: skip
def test_config_json_that_does_not_match_the_weights_is_named(tmp_path: Path, folders, change: dict[str, Any], message: str) -> None:
    folder = edit_config(_copy(folders["kl-16-groups"][1], tmp_path / "vae"), **change)
    with pytest.raises(CheckpointError, match=r"config\.json \(\w+\) does not match diffusion_pytorch_model\.safetensors: .*" + message):
        load_vae(checkpoint=folder)


# ---------------------------------------------------------------- bad folders: one line naming what is missing


def test_bad_folders(tmp_path: Path, folders) -> None:
    source = folders["kl-16-groups"][1]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="not a diffusers model folder: no config.json"):
        load_vae(checkpoint=empty)
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(source / "config.json", no_weights)
    with pytest.raises(CheckpointError, match="no weights next to config.json: expected diffusion_pytorch_model.safetensors or"):
        load_vae(checkpoint=no_weights)
    (no_weights / "diffusion_pytorch_model.safetensors.index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="sharded weights .* are not supported"):
        load_vae(checkpoint=no_weights)
    cases = {
        "{not json": "malformed config.json: Expecting property name",
        "[1, 2]": "malformed config.json: a JSON object expected, got list",
        json.dumps({"_class_name": "AutoencoderTiny"}): "describes a AutoencoderTiny, not a VAE vaetool loads",
        json.dumps({"norm_num_groups": 24, "block_out_channels": [16, 32], "down_block_types": ["DownEncoderBlock2D"] * 2,
                    "up_block_types": ["UpDecoderBlock2D"] * 2}): r"norm_num_groups 24 does not divide block_out_channels \[16, 32\]",
        json.dumps({"block_out_channels": [16, 32]}): "down_block_types must list one block per entry of block_out_channels",
        json.dumps({"down_block_types": ["AttnDownEncoderBlock2D"]}): "down_block_types: AttnDownEncoderBlock2D is not supported",
        json.dumps({"act_fn": "gelu"}): "act_fn 'gelu' is not supported",
        json.dumps({"layers_per_block": "2"}): "layers_per_block must be a positive integer, got '2'",
        json.dumps({"use_quant_conv": "yes"}): "use_quant_conv must be true or false",
    }
    bad = _copy(source, tmp_path / "bad")
    for text, message in cases.items():
        (bad / "config.json").write_text(text)
        with pytest.raises(ConfigError, match=message) as info:
            load_vae(checkpoint=bad)
        assert info.value.path == str(bad / "config.json")


def test_cli_errors_are_one_line(runner, tmp_path: Path, folders) -> None:
    folder = folders["kl-16-groups"][1]
    image = rgb(tmp_path / "a.png", 16, 16)
    cases = {
        ("--checkpoint", str(tmp_path)): f"error: {tmp_path}: not a diffusers model folder",
        ("--checkpoint", str(folder), "-m", "tiny-f8"): "error: " + str(folder / "config.json") + ": a diffusers folder brings its own",
        ("--checkpoint", str(folder / "diffusion_pytorch_model.safetensors"), "--subfolder", "vae"): "--subfolder vae applies to",
    }
    for args, message in cases.items():
        result = runner.invoke(app, ["encode", str(image), "-o", str(tmp_path / "out"), *args, *CPU])
        assert result.exit_code == 2, result.output
        assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr


def test_api_errors(folders) -> None:
    folder = folders["kl-16-groups"][1]
    with pytest.raises(ConfigError, match="brings its own config.json"):
        load_vae("tiny-f8", folder)
    with pytest.raises(UsageError, match="--subfolder vae applies to a diffusers folder or a repo id, not a file"):
        load_vae(checkpoint=folder / "diffusion_pytorch_model.safetensors", subfolder="vae")


def test_info_describes_a_folder(runner, folders) -> None:
    result = runner.invoke(app, ["info", str(folders["temporal"][1]), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    summary = (info["family"], info["class"], info["force_upcast"], info["norm_groups"])
    assert summary == ("custom", "AutoencoderKLTemporalDecoder", True, 32)
    assert info["layout"] == "diffusers-temporal" and info["latent_format"]["scale"] == 0.18215 and info["time_mode"] == "conv-only"
    result = runner.invoke(app, ["info", str(folders["kl-16-groups"][1]), "--json"])
    assert json.loads(result.stdout)["norm_groups"] == 16
