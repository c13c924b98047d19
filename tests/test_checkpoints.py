"""Checkpoint reading, VAE extraction, diffusers -> original conversion, config detection, strict loading."""

from __future__ import annotations

import hashlib
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

from vaetool.checkpoints import (
    config_from_state_dict,
    describe,
    detect_layout,
    extract_vae,
    load_checkpoint,
    load_into,
    read_state_dict,
    to_original,
)
from vaetool.errors import CheckpointError, ConfigError

diffusers = pytest.importorskip("diffusers")

# ---------------------------------------------------------------- tiny diffusers models

VARIANTS: dict[str, dict[str, Any]] = {
    "sd-like": {"block_out_channels": (32, 64), "latent_channels": 4},
    "16-channel": {"block_out_channels": (32, 64), "latent_channels": 16},
    "no-quant-convs": {"block_out_channels": (32, 64), "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False},
    "no-mid-attention": {"block_out_channels": (32, 64), "mid_block_add_attention": False},
    "3-levels": {"block_out_channels": (32, 32, 64), "layers_per_block": 2},
}


def _perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Break the symmetry of default inits (norm weights all 1) so swapped keys change the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _diffusers_kl(**kw: Any) -> nn.Module:
    levels = len(kw["block_out_channels"])
    kw = {"layers_per_block": 1, "norm_num_groups": 32, "latent_channels": 4} | kw
    torch.manual_seed(0)
    return _perturb(
        diffusers.AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels, **kw
        )
    )


def _diffusers_temporal() -> nn.Module:
    torch.manual_seed(0)
    return _perturb(
        diffusers.AutoencoderKLTemporalDecoder(
            block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2, layers_per_block=2
        )
    )


@pytest.fixture(scope="module")
def kl_models() -> dict[str, nn.Module]:
    return {name: _diffusers_kl(**kw) for name, kw in VARIANTS.items()}


@pytest.fixture(scope="module")
def temporal_model() -> nn.Module:
    return _diffusers_temporal()


# ---------------------------------------------------------------- expected original layout (formats.md 1 + 3)


def _resblock(out: dict[str, tuple[int, ...]], name: str, cin: int, cout: int, video: bool = False) -> None:
    for norm, c in (("norm1", cin), ("norm2", cout)):
        out[f"{name}.{norm}.weight"] = out[f"{name}.{norm}.bias"] = (c,)
    out[f"{name}.conv1.weight"], out[f"{name}.conv2.weight"] = (cout, cin, 3, 3), (cout, cout, 3, 3)
    out[f"{name}.conv1.bias"] = out[f"{name}.conv2.bias"] = (cout,)
    if cin != cout:
        out[f"{name}.nin_shortcut.weight"], out[f"{name}.nin_shortcut.bias"] = (cout, cin, 1, 1), (cout,)
    if video:
        for part in ("in_layers.0", "out_layers.0"):
            out[f"{name}.time_stack.{part}.weight"] = out[f"{name}.time_stack.{part}.bias"] = (cout,)
        for part in ("in_layers.2", "out_layers.3"):
            out[f"{name}.time_stack.{part}.weight"], out[f"{name}.time_stack.{part}.bias"] = (cout, cout, 3, 1, 1), (cout,)
        out[f"{name}.mix_factor"] = (1,)


def _attn(out: dict[str, tuple[int, ...]], name: str, c: int) -> None:
    for p in ("norm", "q", "k", "v", "proj_out"):
        out[f"{name}.{p}.weight"] = (c,) if p == "norm" else (c, c, 1, 1)
        out[f"{name}.{p}.bias"] = (c,)


def expected_original(
    widths: tuple[int, ...], nrb: int, z: int, *, quant: bool = True, post: bool = True,
    mid_attn: bool = True, video: bool = False,
) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an original-layout VAE with block widths ch*ch_mult, written from formats.md."""
    out: dict[str, tuple[int, ...]] = {}
    n, top = len(widths), widths[-1]
    out["encoder.conv_in.weight"], out["encoder.conv_in.bias"] = (widths[0], 3, 3, 3), (widths[0],)
    cin = widths[0]
    for i, w in enumerate(widths):
        for j in range(nrb):
            _resblock(out, f"encoder.down.{i}.block.{j}", cin, w)
            cin = w
        if i != n - 1:
            out[f"encoder.down.{i}.downsample.conv.weight"], out[f"encoder.down.{i}.downsample.conv.bias"] = (w, w, 3, 3), (w,)
    for coder in ("encoder", "decoder"):
        _resblock(out, f"{coder}.mid.block_1", top, top, video and coder == "decoder")
        _resblock(out, f"{coder}.mid.block_2", top, top, video and coder == "decoder")
        if mid_attn:
            _attn(out, f"{coder}.mid.attn_1", top)
    out["encoder.norm_out.weight"] = out["encoder.norm_out.bias"] = (top,)
    out["encoder.conv_out.weight"], out["encoder.conv_out.bias"] = (2 * z, top, 3, 3), (2 * z,)
    if quant:
        out["quant_conv.weight"], out["quant_conv.bias"] = (2 * z, 2 * z, 1, 1), (2 * z,)
    if post:
        out["post_quant_conv.weight"], out["post_quant_conv.bias"] = (z, z, 1, 1), (z,)
    out["decoder.conv_in.weight"], out["decoder.conv_in.bias"] = (top, z, 3, 3), (top,)
    cin = top
    for i in reversed(range(n)):  # up.{n-1} is the lowest resolution and runs first
        for j in range(nrb + 1):
            _resblock(out, f"decoder.up.{i}.block.{j}", cin, widths[i], video)
            cin = widths[i]
        if i != 0:
            out[f"decoder.up.{i}.upsample.conv.weight"], out[f"decoder.up.{i}.upsample.conv.bias"] = (cin, cin, 3, 3), (cin,)
    out["decoder.norm_out.weight"] = out["decoder.norm_out.bias"] = (widths[0],)
    out["decoder.conv_out.weight"], out["decoder.conv_out.bias"] = (3, widths[0], 3, 3), (3,)
    if video:
        out["decoder.conv_out.time_mix_conv.weight"], out["decoder.conv_out.time_mix_conv.bias"] = (3, 3, 3, 1, 1), (3,)
    return out


def _expected_for(name: str) -> dict[str, tuple[int, ...]]:
    kw = VARIANTS[name]
    return expected_original(
        kw["block_out_channels"], kw.get("layers_per_block", 1), kw.get("latent_channels", 4),
        quant=kw.get("use_quant_conv", True), post=kw.get("use_post_quant_conv", True),
        mid_attn=kw.get("mid_block_add_attention", True),
    )


def _shapes(sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


# ---------------------------------------------------------------- conversion and config detection


@pytest.mark.parametrize("name", list(VARIANTS))
def test_diffusers_kl_converts_to_exact_original_layout(kl_models: dict[str, nn.Module], name: str) -> None:
    sd = kl_models[name].state_dict()
    assert detect_layout(sd) == "diffusers"
    converted = to_original(sd)
    assert _shapes(converted) == _expected_for(name)
    assert detect_layout(converted) == "original"
    # original-layout input passes through unchanged
    assert all(to_original(converted)[k] is v for k, v in converted.items())


@pytest.mark.parametrize("name", list(VARIANTS))
def test_config_recovers_architecture(kl_models: dict[str, nn.Module], name: str) -> None:
    kw = VARIANTS[name]
    widths = kw["block_out_channels"]
    cfg = config_from_state_dict(to_original(kl_models[name].state_dict()))
    p = cfg["params"]
    assert cfg["target"] == "vaetool.AutoencodingEngine"
    assert p["use_quant_conv"] == kw.get("use_quant_conv", True)
    assert p["use_post_quant_conv"] == kw.get("use_post_quant_conv", True)
    assert p["embed_dim"] == kw.get("latent_channels", 4)
    assert p["decoder_config"]["target"] == "vaetool.Decoder"
    for coder in ("encoder_config", "decoder_config"):
        dd = p[coder]["params"]
        assert dd["ch"] == widths[0]
        assert dd["ch_mult"] == [w // widths[0] for w in widths]
        assert dd["num_res_blocks"] == kw.get("layers_per_block", 1)
        assert dd["z_channels"] == kw.get("latent_channels", 4) and dd["double_z"] is True
        assert dd["in_channels"] == 3 and dd["out_ch"] == 3 and dd["attn_resolutions"] == []
        assert dd["attn_type"] == ("vanilla" if kw.get("mid_block_add_attention", True) else "none")


def test_temporal_decoder_converts_and_detects(temporal_model: nn.Module) -> None:
    sd = temporal_model.state_dict()
    assert detect_layout(sd) == "diffusers-temporal"
    converted = to_original(sd)
    assert _shapes(converted) == expected_original((32, 64), 2, 4, post=False, video=True)
    # the mixer and temporal convs keep their values under the new names
    assert torch.equal(converted["decoder.up.0.block.1.mix_factor"], sd["decoder.up_blocks.1.resnets.1.time_mixer.mix_factor"])
    assert torch.equal(converted["decoder.conv_out.time_mix_conv.weight"], sd["decoder.time_conv_out.weight"])
    p = config_from_state_dict(converted)["params"]
    dec = p["decoder_config"]
    assert dec["target"] == "vaetool.VideoDecoder"
    assert dec["params"]["time_mode"] == "conv-only" and dec["params"]["video_kernel_size"] == [3, 1, 1]
    assert dec["params"]["merge_strategy"] == "learned"
    assert (p["use_quant_conv"], p["use_post_quant_conv"], p["embed_dim"]) == (True, False, 4)
    info = describe(sd)
    assert info["layout"] == "diffusers-temporal" and info["time_mode"] == "conv-only"
    assert info["parameters"] == sum(v.numel() for v in sd.values())


@pytest.mark.parametrize(
    ("drop", "add", "mode"),
    [
        ((), ("decoder.mid.attn_1.time_mix_block.attn1.to_q.weight",), "all"),
        (("mix_factor", "time_stack"), (), "only-last-conv"),
        (("mix_factor", "time_stack", "time_mix_conv"), ("decoder.mid.attn_1.time_mix_block.attn1.to_q.weight",), "attn-only"),
    ],
)
def test_time_mode_table(temporal_model: nn.Module, drop: tuple[str, ...], add: tuple[str, ...], mode: str) -> None:
    sd = {k: v for k, v in to_original(temporal_model.state_dict()).items() if not any(d in k for d in drop)}
    sd |= {k: torch.zeros(64, 64) for k in add}
    assert config_from_state_dict(sd)["params"]["decoder_config"]["params"]["time_mode"] == mode


def test_diffusers_temporal_with_one_mid_resnet_is_incomplete() -> None:
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKLTemporalDecoder(
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2, layers_per_block=1
    )  # its mid block then has one resnet: no original-layout equivalent
    with pytest.raises(CheckpointError, match="decoder.mid.block_2.conv1.weight is missing"):
        config_from_state_dict(to_original(ref.state_dict()))


def test_unrecognised_time_mode_is_an_error(temporal_model: nn.Module) -> None:
    sd = {k: v for k, v in to_original(temporal_model.state_dict()).items() if "time_mix_conv" not in k}
    with pytest.raises(CheckpointError, match="unrecognised temporal decoder"):
        config_from_state_dict(sd)


def test_old_attention_names_and_3d_weights(kl_models: dict[str, nn.Module]) -> None:
    sd = kl_models["sd-like"].state_dict()
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for k, v in sd.items():
        for new_name, old_name in renames.items():
            if f".attentions.0.{new_name}." in k:
                k = k.replace(f".{new_name}.", f".{old_name}.")
                v = v[:, :, None] if v.ndim == 2 else v  # [C, C] -> [C, C, 1] (Conv1d era)
        old[k] = v
    assert any(".query." in k for k in old)
    new, converted = to_original(sd), to_original(old)
    assert converted.keys() == new.keys()
    assert all(torch.equal(converted[k], new[k]) for k in new)


def test_original_2d_attention_weights_become_4d(kl_models: dict[str, nn.Module]) -> None:
    sd = to_original(kl_models["sd-like"].state_dict())
    flat = {k: v.flatten(1) if k.endswith("attn_1.q.weight") else v for k, v in sd.items()}  # [C, C, 1, 1] -> [C, C]
    assert to_original(flat)["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)


def test_unmapped_and_mixed_keys_are_errors(kl_models: dict[str, nn.Module]) -> None:
    sd = dict(kl_models["sd-like"].state_dict())
    with pytest.raises(CheckpointError, match=r"1 diffusers key.*encoder\.down_blocks\.0\.resnets\.0\.foo\.weight"):
        to_original(sd | {"encoder.down_blocks.0.resnets.0.foo.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="both original and diffusers"):
        detect_layout(sd | {"decoder.up.0.block.0.conv1.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="neither"):
        detect_layout({"encoder.conv_in.weight": torch.zeros(1)})


def test_inconsistent_dict_is_an_error(kl_models: dict[str, nn.Module]) -> None:
    sd = to_original(kl_models["sd-like"].state_dict())
    with pytest.raises(CheckpointError, match="decoder.conv_in.weight is missing"):
        config_from_state_dict({k: v for k, v in sd.items() if not k.startswith("decoder.conv_in")})
    with pytest.raises(CheckpointError, match="inconsistent latent channels"):
        config_from_state_dict(sd | {"post_quant_conv.weight": torch.zeros(4, 3, 1, 1)})
    with pytest.raises(CheckpointError, match="gaps"):
        config_from_state_dict(sd | {"encoder.down.5.block.0.conv1.weight": torch.zeros(32, 32, 3, 3)})


# ---------------------------------------------------------------- extraction: prefixes, nesting, EMA


@pytest.fixture(scope="module")
def original_sd(kl_models: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    return to_original(kl_models["sd-like"].state_dict())


@pytest.mark.parametrize("prefix", ["", "first_stage_model.", "vae.", "conditioner.embedders.1.encoder."])
def test_extract_finds_prefix(original_sd: dict[str, torch.Tensor], prefix: str) -> None:
    whole = {prefix + k: v for k, v in original_sd.items()}
    whole |= {"model.diffusion_model.out.0.weight": torch.zeros(2), "cond_stage_model.x": torch.zeros(1)}
    found = extract_vae({"state_dict": whole, "global_step": 7, "epoch": 1})
    assert found.prefix == prefix and not found.has_ema and not found.used_ema
    assert found.state_dict.keys() == original_sd.keys()


def test_extract_unwraps_model_wrapper_and_drops_training_keys(original_sd: dict[str, torch.Tensor]) -> None:
    found = extract_vae({"model": original_sd | {"loss.logvar": torch.zeros(()), "loss.discriminator.w": torch.zeros(1)}})
    assert found.state_dict.keys() == original_sd.keys()


def test_extract_nothing_vae_like() -> None:
    with pytest.raises(CheckpointError, match=r"no VAE weights found.*keys seen: a\.weight, b\.bias"):
        extract_vae({"a.weight": torch.zeros(1), "b.bias": torch.zeros(1), "step": 3})


def test_ema_weights(original_sd: dict[str, torch.Tensor]) -> None:
    ema = {"model_ema." + k.replace(".", ""): v + 1 for k, v in original_sd.items()}
    sd = original_sd | ema | {"model_ema.decay": torch.tensor(0.999), "model_ema.num_updates": torch.tensor(10)}
    plain = extract_vae(sd)
    assert plain.has_ema and not plain.used_ema and plain.state_dict.keys() == original_sd.keys()
    assert torch.equal(plain.state_dict["encoder.conv_in.weight"], original_sd["encoder.conv_in.weight"])
    used = extract_vae(sd, ema=True)
    assert used.used_ema and used.state_dict.keys() == original_sd.keys()
    assert torch.equal(used.state_dict["decoder.up.1.block.0.conv1.weight"], original_sd["decoder.up.1.block.0.conv1.weight"] + 1)
    with pytest.raises(CheckpointError, match="no model_ema copies"):
        extract_vae(original_sd, ema=True)


# ---------------------------------------------------------------- files


def test_same_weights_in_every_container(tmp_path: Path, kl_models: dict[str, nn.Module], original_sd: dict[str, torch.Tensor]) -> None:
    files = {
        "bare.safetensors": lambda p: safetensors.torch.save_file(original_sd, p),
        "prefixed.safetensors": lambda p: safetensors.torch.save_file({f"first_stage_model.{k}": v for k, v in original_sd.items()}, p),
        "nested.ckpt": lambda p: torch.save(
            {"state_dict": {f"first_stage_model.{k}": v for k, v in original_sd.items()}, "global_step": 3}, p
        ),
        "bare.pt": lambda p: torch.save(original_sd, p),
        "diffusers.safetensors": lambda p: safetensors.torch.save_file(kl_models["sd-like"].state_dict(), p),
        "sniffed.weights": lambda p: safetensors.torch.save_file(original_sd, p),  # unknown extension
        "sniffed-pickle.weights": lambda p: torch.save(original_sd, p),
    }
    for name, write in files.items():
        write(str(tmp_path / name))
        loaded = load_checkpoint(tmp_path / name)
        assert loaded.state_dict.keys() == original_sd.keys(), name
        assert all(torch.equal(loaded.state_dict[k], v) for k, v in original_sd.items()), name
        assert loaded.config == config_from_state_dict(original_sd), name
        assert loaded.sha256 == hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
        assert loaded.prefix == ("first_stage_model." if "prefixed" in name or "nested" in name else "")
        assert loaded.layout == ("diffusers" if name.startswith("diffusers") else "original")


def test_missing_empty_and_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file") as err:
        read_state_dict(tmp_path / "nope.safetensors")
    assert str(err.value) == f"{tmp_path / 'nope.safetensors'}: no such file"
    for name in ("empty.safetensors", "empty.ckpt"):
        (tmp_path / name).write_bytes(b"")
        with pytest.raises(CheckpointError, match="empty file"):
            read_state_dict(tmp_path / name)
    with pytest.raises(CheckpointError, match="is a directory"):
        read_state_dict(tmp_path)


def test_truncated_and_corrupt_safetensors(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    safetensors.torch.save_file({"encoder.conv_in.weight": torch.randn(8, 3, 3, 3)}, str(good))
    data = good.read_bytes()
    cases = {
        "cut-data.safetensors": (data[:-10], "truncated"),
        "cut-header.safetensors": (data[:20], "truncated"),
        "tiny.safetensors": (data[:5], "truncated"),
        "garbage.safetensors": (b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"not json at all!" + b"\x00" * 8, "corrupt"),
    }
    for name, (content, word) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=word) as err:
            read_state_dict(tmp_path / name)
        assert str(err.value).startswith(str(tmp_path / name)) and "\n" not in str(err.value)


def test_truncated_pickle(tmp_path: Path) -> None:
    buf = io.BytesIO()
    torch.save({"w": torch.randn(64)}, buf)
    (tmp_path / "cut.ckpt").write_bytes(buf.getvalue()[:-40])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
        read_state_dict(tmp_path / "cut.ckpt")
    assert "\n" not in str(err.value)


class _Payload:
    """Unpickling this would call open(marker, 'w') and so create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_unsafe_pickle_is_refused_and_never_runs(tmp_path: Path, writer: str) -> None:
    marker, path = tmp_path / "PWNED", tmp_path / "evil.ckpt"
    payload = {"state_dict": {"encoder.conv_in.weight": torch.zeros(1)}, "hook": _Payload(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps({"hook": _Payload(marker)}, protocol=2))  # a plain pickle, no tensors
    with pytest.raises(CheckpointError, match=r"unsafe pickle: it would import .*open.*refusing") as err:
        read_state_dict(path)
    assert not marker.exists()
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_numpy_scalars_in_a_pickle_are_fine(tmp_path: Path, original_sd: dict[str, torch.Tensor]) -> None:
    torch.save({"state_dict": original_sd, "best_score": np.float64(0.5)}, tmp_path / "np.ckpt")
    assert load_checkpoint(tmp_path / "np.ckpt").state_dict.keys() == original_sd.keys()


def test_load_checkpoint_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "not-a-vae.safetensors"
    safetensors.torch.save_file({"model.diffusion_model.w": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="no VAE weights found") as err:
        load_checkpoint(path)
    assert err.value.path == str(path)


def test_bad_norm_groups_metadata_is_named(kl_models: dict[str, nn.Module], tmp_path: Path) -> None:
    path = tmp_path / "groups.safetensors"
    sd = {k: v.contiguous() for k, v in to_original(kl_models["3-levels"].state_dict()).items()}
    safetensors.torch.save_file(sd, str(path), metadata={"norm_groups": "eight"})
    with pytest.raises(CheckpointError, match="metadata norm_groups must be a positive integer, got 'eight'") as err:
        load_checkpoint(path)
    assert err.value.path == str(path)


# ---------------------------------------------------------------- strict loading


def test_load_into_reports_missing_unexpected_and_wrong_shapes() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.GroupNorm(2, 4), nn.Conv2d(4, 4, 1))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"1 wrong shape \(0\.weight \[5, 3, 1, 1\] vs model \[4, 3, 1, 1\]\)") as err:
        load_into(model, sd | {"0.weight": torch.zeros(5, 3, 1, 1)}, "x.safetensors")
    assert str(err.value).startswith("x.safetensors: ")
    partial = {k: v for k, v in sd.items() if not k.startswith("2.")}
    with pytest.raises(CheckpointError, match=r"2 missing \(2\.bias, 2\.weight\); 1 unexpected \(9\.weight\)"):
        load_into(model, partial | {"9.weight": torch.zeros(1)})
    half = {k: (v + 1).half() for k, v in sd.items()}
    load_into(model, half)
    assert model[0].weight.dtype == torch.float32
    assert torch.equal(model[0].weight, half["0.weight"].float())


# ---------------------------------------------------------------- parity with diffusers through vaetool's models



def _vaetool_model(sd_original: dict[str, torch.Tensor]) -> nn.Module:
    from vaetool.config import instantiate_from_config

    model = instantiate_from_config(config_from_state_dict(sd_original)).eval()
    load_into(model, sd_original)
    return model


@pytest.mark.parametrize("name", ["sd-like", "16-channel", "no-quant-convs", "no-mid-attention", "3-levels"])
def test_parity_with_diffusers(kl_models: dict[str, nn.Module], name: str) -> None:
    ref = kl_models[name]
    model = _vaetool_model(to_original(ref.state_dict()))
    gen = torch.Generator().manual_seed(1)
    shapes = [(1, 3, 40, 56), (2, 3, 64, 48)] if name == "sd-like" else [(1, 3, 40, 56)]
    with torch.no_grad():
        for shape in shapes:
            x = torch.rand(shape, generator=gen) * 2 - 1
            post = ref.encode(x).latent_dist
            mean, logvar = model.encode_moments(x).chunk(2, dim=1)  # [B, 2z, h, w] -> 2 x [B, z, h, w]
            torch.testing.assert_close(mean, post.mean, atol=1e-4, rtol=0)
            torch.testing.assert_close(logvar.clamp(-30, 20), post.logvar, atol=1e-4, rtol=0)
            torch.testing.assert_close(model.decode(post.mean), ref.decode(post.mean).sample, atol=1e-4, rtol=0)


def test_norm_groups_parity_with_diffusers() -> None:
    ref = _diffusers_kl(block_out_channels=(32, 64), norm_num_groups=8)
    config = config_from_state_dict(to_original(ref.state_dict()))
    for coder in ("encoder_config", "decoder_config"):
        config["params"][coder]["params"]["norm_groups"] = 8
    from vaetool.config import instantiate_from_config

    model = instantiate_from_config(config).eval()
    load_into(model, to_original(ref.state_dict()))
    x = torch.rand((1, 3, 40, 56), generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        mean = model.encode_moments(x).chunk(2, dim=1)[0]
        torch.testing.assert_close(mean, ref.encode(x).latent_dist.mean, atol=1e-4, rtol=0)
        torch.testing.assert_close(model.decode(mean), ref.decode(mean).sample, atol=1e-4, rtol=0)
    with pytest.raises(ConfigError, match="cannot build vaetool.Encoder: norm_groups 24 does not divide"):
        instantiate_from_config(config | {"params": config["params"] | {"encoder_config": {
            "target": "vaetool.Encoder", "params": config["params"]["encoder_config"]["params"] | {"norm_groups": 24}}}})


def test_temporal_decoder_parity_with_diffusers(temporal_model: nn.Module) -> None:
    model = _vaetool_model(to_original(temporal_model.state_dict()))
    frames = 3
    x = torch.rand(2 * frames, 3, 24, 40, generator=torch.Generator().manual_seed(2)) * 2 - 1  # 2 clips of 3 frames
    with torch.no_grad():
        post = temporal_model.encode(x).latent_dist
        mean, _ = model.encode_moments(x).chunk(2, dim=1)
        torch.testing.assert_close(mean, post.mean, atol=1e-4, rtol=0)
        ref = temporal_model.decode(post.mean, num_frames=frames).sample
        torch.testing.assert_close(model.decode(post.mean, timesteps=frames), ref, atol=1e-4, rtol=0)
