"""The training config: a YAML with the model, data, optimizer, loss and schedule, checked key by key."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vaetool.config import find_config_file, load_yaml
from vaetool.errors import ConfigError


@dataclass(frozen=True)
class DataSettings:
    """Where the images are and how training crops are made from them."""

    train: list[str]
    val: list[str] = field(default_factory=list)
    crop: int = 128
    batch_size: int = 4
    scale: tuple[float, float] = (0.5, 1.0)  # random downscale of the source before cropping
    flip: bool = True
    rot90: bool = True
    color_jitter: float = 0.0  # max relative change of brightness / saturation
    channel_shuffle: float = 0.0  # probability of permuting a crop's RGB channels (colour variety)
    grayscale: float = 0.0  # probability of turning a crop gray (R = G = B): teaches the model to keep gray gray
    val_size: int = 512  # validation images are centre-cropped to at most this (multiple of 8)


@dataclass(frozen=True)
class LossSettings:
    """Weights of the reconstruction terms and of the regularizer's KL.

    l1 and mse are means over pixel values. kl weighs the KL summed over a sample's latent elements
    against the reconstruction summed over its pixel values, as `kl_weight` does in the original
    LPIPSWithDiscriminator (1e-6 there); the trainer divides the KL by C*H*W to match the means.
    """

    l1: float = 1.0
    mse: float = 0.0
    kl: float = 1e-6
    lowpass: float = 0.0  # MSE of the lowpass_size x lowpass_size block means: the low-frequency (colour) error, weighted up
    lowpass_size: int = 8
    ssim: float = 0.0  # weight of 1 - SSIM (11x11 Gaussian window, sigma 1.5, per channel, on [0, 1]): local structure


@dataclass(frozen=True)
class TrainSettings:
    """Everything `vaetool train` needs, from one YAML file."""

    model: dict[str, Any]
    data: DataSettings
    loss: LossSettings = LossSettings()
    optimizer: dict[str, Any] = field(default_factory=lambda: {"target": "torch.optim.AdamW"})
    lr: float = 2e-4
    warmup: int = 100
    schedule: str = "cosine"  # or "constant"
    steps: int = 1000
    ema_decay: float = 0.999
    precision: str = "fp32"  # or "bf16": the forward pass under autocast (weights, optimizer and loss stay fp32)
    init_logvar: float | None = None  # a fresh model's posterior log-variance bias (e.g. -8: near-noiseless latents)
    gradient_checkpointing: bool = False  # recompute each res/attention block in backward: less memory, more time
    channels_last: bool = False  # NHWC weights and batches: faster bf16 convolutions where oneDNN has AMX/AVX-512 bf16
    checkpoint_every: int = 100
    val_every: int = 100
    log_every: int = 10
    seed: int = 0
    source: str = "<config>"


SCHEDULES = ("cosine", "constant")
PRECISIONS = ("fp32", "bf16")


def _check_keys(section: str, given: dict[str, Any], cls: type, source: str) -> None:
    """Refuse a key the dataclass does not have, naming it and the closest known key."""
    known = [f.name for f in dataclasses.fields(cls) if f.name != "source"]
    for key in given:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"
            where = f"{section}.{key}" if section else key
            raise ConfigError(f"unknown key {where!r}{hint}", source)


def _model_section(value: Any, source: Path) -> dict[str, Any]:
    """`model:` is a shipped config name, a YAML path (relative to the training config), or inline."""
    if isinstance(value, dict):
        return value
    if not isinstance(value, str):
        raise ConfigError("'model' must be a config name, a YAML path or a target/params mapping", source)
    relative = source.parent / value
    doc = load_yaml(relative if relative.exists() else find_config_file(value))
    return doc.get("model", doc)


def load_train_settings(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainSettings:
    """Read a training YAML; unknown keys and bad values are ConfigErrors naming the key."""
    path = Path(path)
    doc = load_yaml(path) | (overrides or {})
    _check_keys("", doc, TrainSettings, str(path))
    for key in ("model", "data"):
        if key not in doc:
            raise ConfigError(f"missing required key {key!r}", path)
    data = doc["data"]
    if not isinstance(data, dict) or "train" not in data:
        raise ConfigError("'data' must be a mapping with a 'train' list of image folders", path)
    _check_keys("data", data, DataSettings, str(path))
    _check_keys("loss", doc.get("loss") or {}, LossSettings, str(path))

    def folders(value: Any) -> list[str]:
        items = [value] if isinstance(value, str) else list(value or [])
        return [str(p if Path(p).is_absolute() else (path.parent / p if (path.parent / p).exists() else Path(p))) for p in items]

    try:
        data_settings = DataSettings(**(data | {"train": folders(data["train"]), "val": folders(data.get("val"))}))
        if "scale" in data:
            data_settings = dataclasses.replace(data_settings, scale=tuple(float(s) for s in data["scale"]))
        rest = {k: v for k, v in doc.items() if k not in ("model", "data", "loss")}
        settings = TrainSettings(
            model=_model_section(doc["model"], path),
            data=data_settings,
            loss=LossSettings(**(doc.get("loss") or {})),
            source=str(path),
            **rest,
        )
    except (TypeError, ValueError) as err:
        raise ConfigError(f"bad value: {err}", path) from None
    if settings.schedule not in SCHEDULES:
        raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {settings.schedule!r}", path)
    if settings.loss.lowpass_size <= 0 or settings.data.crop % settings.loss.lowpass_size:
        raise ConfigError(f"loss.lowpass_size must divide data.crop, got {settings.loss.lowpass_size}", path)
    if settings.precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {settings.precision!r}", path)
    if settings.data.crop % 8 or settings.data.crop <= 0:
        raise ConfigError(f"data.crop must be a positive multiple of 8, got {settings.data.crop}", path)
    for flag in ("gradient_checkpointing", "channels_last"):
        if not isinstance(getattr(settings, flag), bool):
            raise ConfigError(f"{flag} must be true or false, got {getattr(settings, flag)!r}", path)
    if settings.steps <= 0 or settings.data.batch_size <= 0:
        raise ConfigError("steps and data.batch_size must be positive", path)
    return settings
