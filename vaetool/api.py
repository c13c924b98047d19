"""The library API the commands use: load a VAE from a config and/or checkpoint, encode, decode."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vaetool import tiling as tiled
from vaetool.config import instantiate_from_config, load_vae_config
from vaetool.devices import conv_memory_format
from vaetool.errors import ConfigError, UsageError
from vaetool.families import LatentFormat, bind_statistics, get_family
from vaetool.io.images import crop_to, pad_to_multiple
from vaetool.nn.autoencoder import AutoencodingEngine
from vaetool.nn.util import loaded_weight
from vaetool.tiling import Tiling

DEFAULT_MODEL = "mini"
UNLOADED = {"all": None, "encoder": "decoder", "decoder": "encoder"}  # parts= -> the coder left unloaded


class RandomWeightsWarning(UserWarning):
    """A model was built with random weights (a test model, or random_weights=True)."""


@dataclass
class Vae:
    """A loaded autoencoder with the latent format of its family and where it came from."""

    model: AutoencodingEngine
    latent_format: LatentFormat
    source: dict[str, Any] = field(default_factory=dict)
    parts: str = "all"  # "encoder" or "decoder": only that coder's weights are loaded (the other is on the meta device)

    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        return loaded_weight(self.model).device

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the weights."""
        return loaded_weight(self.model).dtype

    @property
    def downscale(self) -> int:
        """Spatial factor between image and latent (8 for f8 models)."""
        return self.model.downscale

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Vae:
        """Move the weights (those loaded: a coder left on the meta device stays there); returns self."""
        unloaded = UNLOADED[self.parts]
        if unloaded is None:
            self.model.to(device=device, dtype=dtype)
        else:
            for name, child in self.model.named_children():  # the models keep every weight in a child module
                child.to(device=device if name != unloaded else None, dtype=dtype)
        layout = conv_memory_format(self.device, self.dtype)
        for conv in self.model.modules():  # 2-D convolutions only: Conv3d weights have no channels_last
            if isinstance(conv, torch.nn.Conv2d) and conv.weight.device.type != "meta":
                conv.weight.data = conv.weight.data.contiguous(memory_format=layout)
        return self

    def _require(self, part: str, verb: str) -> None:
        if self.parts not in ("all", part):
            raise UsageError(f"this VAE was loaded with parts={self.parts!r}, so it cannot {verb}: load it with parts='all' or {part!r}")

    @torch.inference_mode()
    def moments(self, images: torch.Tensor, *, tiling: Tiling | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images [B, 3, H, W] in [-1, 1] -> posterior (mean, logvar), each [B, C, ceil(H/f), ceil(W/f)], within `tiling`."""
        self._require("encoder", "encode")
        moments = tiled.encode(self.model, images, tiling)  # [B, 2C, h, w]
        mean, logvar = torch.chunk(moments, 2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    @torch.inference_mode()
    def encode(
        self,
        images: torch.Tensor,
        *,
        sample: bool = False,
        generator: torch.Generator | None = None,
        scaled: bool = False,
        tiling: Tiling | None = None,
    ) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> raw latents [B, C, ceil(H/f), ceil(W/f)] (the posterior mode, or a sample).

        Images are padded (replicate) on the bottom/right to a multiple of the downscale, as the
        commands do; `decode(..., size=(H, W))` crops back. `scaled` applies the family's scale/shift.
        """
        images, _ = pad_to_multiple(images, self.downscale)  # [B, 3, H', W']
        mean, logvar = self.moments(images, tiling=tiling)
        latents = mean
        if sample:
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            latents = mean + torch.exp(0.5 * logvar) * eps
        return self.latent_format.to_scaled(latents) if scaled else latents

    @torch.inference_mode()
    def decode(
        self,
        latents: torch.Tensor,
        *,
        scaled: bool = False,
        tiling: Tiling | None = None,
        timesteps: int | None = None,
        size: tuple[int, int] | None = None,
        clamp: bool = True,
    ) -> torch.Tensor:
        """Latents [B, C, h, w] (raw, or scaled when `scaled`) -> images [B, 3, h*f, w*f], about [-1, 1], within `tiling`.

        `size` (H, W) crops to the image's size before padding; images are clipped to [-1, 1] unless
        `clamp=False` (the raw decode, as diffusers returns it, which can overshoot slightly).
        """
        self._require("decoder", "decode")
        z = latents.to(self.device, self.dtype)
        if scaled:
            z = self.latent_format.to_raw(z)
        images = tiled.decode(self.model, z, tiling, timesteps=timesteps)  # [B, 3, H', W']
        if size is not None:
            images = crop_to(images, (int(size[0]), int(size[1])))
        return images.clamp(-1.0, 1.0) if clamp else images


def _resolve_format(
    model: AutoencodingEngine, declared: LatentFormat | None, family: str | None, source: str
) -> LatentFormat:
    channels = int(model.embed_dim)
    downscale = int(model.downscale)
    if family is not None:
        try:
            fmt = get_family(family)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    elif declared is not None:
        fmt = declared
    else:
        fmt = LatentFormat("unknown", channels, 1.0, 0.0, downscale)
    if fmt.channels == 0:  # an upstream YAML gives only scale_factor
        fmt = dataclasses.replace(fmt, channels=channels, downscale=downscale)
    if fmt.channels != channels or fmt.downscale != downscale:
        raise ConfigError(
            f"family {fmt.family!r} has {fmt.channels}-channel f{fmt.downscale} latents, "
            f"but the model has {channels}-channel f{downscale} latents",
            source,
        )
    try:
        return bind_statistics(fmt, model)  # Flux.2: the BatchNorm statistics in the checkpoint
    except ValueError as err:
        raise ConfigError(str(err), source) from None


def load_vae(
    config: str | Path | None = None,
    checkpoint: str | Path | None = None,
    *,
    subfolder: str | None = None,
    family: str | None = None,
    ema: bool = False,
    overrides: list[str] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    random_weights: bool = False,
    parts: str = "all",
) -> Vae:
    """Build a VAE from a config (shipped name or YAML) and/or a checkpoint; the default model if neither.

    `parts="decoder"` (or "encoder") loads only that coder's weights: the other is never read from
    the checkpoint (its keys and shapes are still checked) and stays on the meta device.

    A config without weights is an error unless it is a test model (`test_model: true`) or
    `random_weights=True` asks for random weights; those are then recorded in `vae.source`.
    `checkpoint` is a weights file, a diffusers folder (its config.json is honoured; `subfolder` picks
    the VAE inside a pipeline, vae/ by default) or a Hugging Face repo id "ORG/NAME[@REV]" (a str).
    """
    from vaetool.checkpoints import load_into
    from vaetool.sources import advised_dtype, check_family, open_checkpoint

    if parts not in UNLOADED:
        raise UsageError(f"parts={parts!r}: expected one of {', '.join(UNLOADED)}")
    unloaded = UNLOADED[parts]
    if config is None and checkpoint is None:
        config = DEFAULT_MODEL
    vcfg = load_vae_config(config, overrides) if config is not None else None
    source: dict[str, Any] = {"config": None if vcfg is None else vcfg.source}
    if checkpoint is None and vcfg is not None and vcfg.checkpoint is not None:
        checkpoint = vcfg.checkpoint
    loaded = open_checkpoint(checkpoint, ema=ema, subfolder=subfolder, without=unloaded) if checkpoint is not None else None
    if vcfg is not None and loaded is not None and "diffusers_config" in loaded.origin:
        raise ConfigError("a diffusers folder brings its own config.json: give it without --config/--model "
                          "(--family names the family)", loaded.origin["diffusers_config"])
    model_cfg = with_family(vcfg.model if vcfg is not None else loaded.config, family)
    if loaded is not None:  # built on the meta device: no initialisation, the checkpoint's tensors become the weights
        with torch.device("meta"):
            model = instantiate_from_config(model_cfg)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # a config without weights gets the same random weights in every process
            model = instantiate_from_config(model_cfg)
        if unloaded is not None:
            setattr(model, unloaded, getattr(model, unloaded).to("meta"))
    if loaded is None:
        if not random_weights and not (vcfg is not None and vcfg.test_model):
            raise UsageError(
                f"{config}: no weights: this config names no checkpoint; give them with --checkpoint FILE "
                "(Python: checkpoint=...), or ask for random weights with --random-weights (random_weights=True) for a test run"
            )
        source["random_weights"] = True
        warnings.warn(f"{config}: random weights: the outputs mean nothing (they are marked random_weights: true)",
                      RandomWeightsWarning, stacklevel=2)
    else:
        load_into(model, loaded.state_dict, loaded.path, assign=True)
        _check_loaded(model, unloaded)
        source |= {"checkpoint": str(loaded.path), "sha256": loaded.sha256, "layout": loaded.layout, "ema": loaded.used_ema}
    model.eval().requires_grad_(False)
    declared = vcfg.latent_format if vcfg is not None else (loaded.latent_format if loaded is not None else None)
    fmt = _resolve_format(model, declared, family, str(checkpoint or config))
    if loaded is not None:
        check_family(loaded.latent_format, fmt, str(checkpoint))
        source |= loaded.origin
    source["family"] = fmt.family
    dtype, note = advised_dtype(loaded, dtype)
    if note is not None:
        source["notes"] = [note]
    return Vae(model=model, latent_format=fmt, source=source, parts=parts).to(device, dtype)


def with_family(model_cfg: dict[str, Any], family: str | None) -> dict[str, Any]:
    """A model config whose `params.family` is left unset (a TAESD read from its keys) with `family` filled in."""
    params = model_cfg.get("params")
    if family is None or not isinstance(params, dict) or "family" not in params or params["family"] is not None:
        return model_cfg
    return {**model_cfg, "params": {**params, "family": family.lower()}}


def _check_loaded(model: torch.nn.Module, unloaded: str | None) -> None:
    """Every weight outside the unloaded coder holds data (none was left on the meta device)."""
    skip = () if unloaded is None else (f"{unloaded}.",)
    empty = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta and not n.startswith(skip)]
    if empty:
        raise RuntimeError(f"weights left without data after loading: {', '.join(empty[:5])}")


def load_image(path: str | Path) -> torch.Tensor:
    """An image file (PNG, JPEG, WebP, BMP, TIFF; any mode, EXIF orientation applied) -> [3, H, W] in [-1, 1]."""
    from vaetool.io import images

    return images.load_image(path)


def save_image(image: torch.Tensor, path: str | Path, *, bits: int = 8, overwrite: bool = True) -> Path:
    """An image [3, H, W] (or [1, 3, H, W]) in [-1, 1] -> a PNG file (8- or 16-bit), written atomically; returns its path."""
    from vaetool.io import images

    image = image[0] if image.ndim == 4 and image.shape[0] == 1 else image
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images.save_png(path, image.detach().float().cpu(), bits=bits, overwrite=overwrite)
    return path
