"""LatentFormat: scalar scale/shift (unchanged for the SD families), per-channel mean/std (Wan, Qwen-Image),
patchify + checkpoint statistics (Flux.2), JSON round trips, validation; and the model protocol every
shipped tiny config satisfies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vaetool.config import instantiate_from_config, load_vae_config
from vaetool.errors import ConfigError
from vaetool.families import FAMILIES, WAN_MEAN, WAN_STD, LatentFormat, bind_statistics, get_family, patchify, unpatchify
from vaetool.nn.protocol import LatentAutoencoder, VideoAutoencoder

OLD_FAMILIES = ("sd1", "sd2", "sdxl", "sd3", "flux", "svd", "sd-x4-upscaler")


def test_scalar_families_are_unchanged() -> None:
    raw = torch.randn(2, 16, 5, 7)
    for name in OLD_FAMILIES:
        fmt = get_family(name)
        assert set(fmt.as_dict()) == {"family", "channels", "scale", "shift", "downscale"}
        x = raw[:, : fmt.channels]
        assert torch.equal(fmt.to_scaled(x), (x - fmt.shift) * fmt.scale)
        assert torch.equal(fmt.to_raw(x), x / fmt.scale + fmt.shift)


def test_every_family_round_trips_through_json() -> None:
    stats = (tuple(float(i) for i in range(128)), tuple(1.0 + i / 10 for i in range(128)))
    formats = [*FAMILIES.values(), get_family("flux2").with_statistics(*stats)]
    for fmt in formats:
        again = LatentFormat.from_dict(json.loads(json.dumps(fmt.as_dict())))
        assert again == fmt


def test_per_channel_statistics_on_images_and_videos() -> None:
    fmt = get_family("wan")
    for shape in ((2, 16, 3, 4), (1, 16, 3, 2, 2)):
        raw = torch.randn(shape, dtype=torch.float64)
        scaled = fmt.to_scaled(raw)
        for c in (0, 7, 15):
            torch.testing.assert_close(scaled[:, c], (raw[:, c] - WAN_MEAN[c]) / WAN_STD[c])
        torch.testing.assert_close(fmt.to_raw(scaled), raw)
    with pytest.raises(ValueError, match="16 channels at this stage, got 4"):
        fmt.to_scaled(torch.zeros(1, 4, 2, 2))


def test_patchify_order_is_channel_row_column() -> None:
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    p = patchify(x, 2)
    assert p.shape == (2, 12, 2, 3)
    for c in range(3):
        for i in range(2):
            for j in range(2):
                assert torch.equal(p[:, 4 * c + 2 * i + j], x[:, c, i::2, j::2])
    assert torch.equal(unpatchify(p, 2), x)
    with pytest.raises(ValueError, match="does not split into 2x2"):
        patchify(torch.zeros(1, 3, 3, 4), 2)


def test_checkpoint_statistics_must_be_bound() -> None:
    fmt = get_family("flux2")
    assert (fmt.scaled_channels, fmt.scaled_downscale) == (128, 16)
    with pytest.raises(ValueError, match="bind them first"):
        fmt.to_raw(torch.zeros(1, 128, 2, 2))
    model = instantiate_from_config(load_vae_config("tiny-flux2").model)
    model.bn.running_mean.fill_(0.5)
    model.bn.running_var.fill_(3.0)
    bound = bind_statistics(fmt, model)
    raw = torch.randn(1, 32, 4, 6)
    torch.testing.assert_close(bound.to_scaled(raw), (patchify(raw, 2) - 0.5) / (3.0 + 1e-4) ** 0.5)
    assert bind_statistics(get_family("sd1"), model) is get_family("sd1")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"mean": (0.0,) * 3, "std": (1.0,) * 4}, "3 means and 4 stds"),
        ({"mean": (0.0,) * 4}, "go together"),
        ({"mean": (0.0,) * 4, "std": (1.0, 1.0, 0.0, 1.0)}, "std must be positive"),
        ({"scale": 0.0}, "finite number > 0"),
        ({"patch": 0}, "must be positive"),
    ],
)
def test_malformed_formats_are_refused(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LatentFormat.from_dict({"family": "x", "channels": 4, "scale": 1.0} | fields)
    with pytest.raises(ValueError, match="unknown latent-format field"):
        LatentFormat.from_dict({"family": "x", "channels": 4, "scale": 1.0, "colour": "blue"})


def test_a_config_declares_per_channel_statistics(tmp_path: Path) -> None:
    text = (Path(load_vae_config("tiny-wan").source)).read_text()
    custom = tmp_path / "custom.yaml"
    custom.write_text(text.replace("family: wan", "family: my-wan\nlatent_format: {channels: 16, scale: 1, mean: "
                                   f"{[0.0] * 16}, std: {[2.0] * 16}}}"))
    fmt = load_vae_config(custom).latent_format
    assert fmt.family == "my-wan" and fmt.std == (2.0,) * 16 and fmt.downscale == 8
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("family: wan", "family: wan\nlatent_format: {std: [1.0]}"))
    with pytest.raises(ConfigError, match="latent_format: wan: 16 means and 1 stds"):
        load_vae_config(bad)


@pytest.mark.parametrize("name", ["tiny-f8", "tiny-wan", "tiny-flux2", "tiny-taesd"])
def test_tiny_models_follow_the_protocol(name: str) -> None:
    cfg = load_vae_config(name)
    model = instantiate_from_config(cfg.model).eval()
    assert isinstance(model, LatentAutoencoder)
    assert (model.embed_dim, model.downscale) == (cfg.latent_format.channels, cfg.latent_format.downscale)
    with torch.no_grad():
        moments = model.encode_moments(torch.zeros(1, 3, 32, 48))
        assert moments.shape == (1, 2 * model.embed_dim, 4, 6)
        assert model.decode(moments[:, : model.embed_dim]).shape == (1, 3, 32, 48)
    assert isinstance(model, VideoAutoencoder) == (name == "tiny-wan")
