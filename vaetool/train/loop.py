"""The training loop: reconstruction + KL, EMA weights, checkpoints every N steps, resume after a kill."""

from __future__ import annotations

import copy
import csv
import errno
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

from vaetool import __version__
from vaetool.checkpoints import load_checkpoint, load_into
from vaetool.config import instantiate_from_config
from vaetool.errors import CheckpointError, ConfigError
from vaetool.io.atomic import atomic_write, remove_stale_temps
from vaetool.io.images import to_uint8
from vaetool.io.safe import write_safetensors
from vaetool.metrics import psnr
from vaetool.nn.autoencoder import AutoencodingEngine
from vaetool.nn.checkpoint import set_gradient_checkpointing
from vaetool.train.data import center_crop, load_folder_images, random_batch, to_unit
from vaetool.train.settings import TrainSettings

STATE_FILE, WEIGHTS_FILE, LOG_FILE, SUMMARY_FILE = "state.pt", "model.safetensors", "log.csv", "summary.json"
LOG_FIELDS = ("step", "loss", "l1", "mse", "kl", "lowpass", "ssim", "lr", "val_psnr", "seconds")
Progress = Callable[[int, int, dict[str, float]], None]
AUTOCAST = {"fp32": torch.float32, "bf16": torch.bfloat16}  # `precision`: the forward pass's autocast dtype


@dataclass(frozen=True)
class TrainResult:
    """What a training run left behind."""

    out_dir: Path
    weights: Path
    step: int
    resumed_from: int
    val_psnr: float | None
    latent_std: float | None
    seconds: float


def init_posterior_logvar(model: AutoencodingEngine, logvar: float) -> None:
    """Set the bias of the layer that outputs the posterior's log-variance (quant_conv, else encoder.conv_out).

    A fresh VAE starts with logvar about 0: the decoder trains on latents drowned in unit noise, and
    low-variance content (colour) stays below that noise for a long time. Starting at e.g. -8 makes
    the posterior nearly deterministic from the first step; the KL term is free to raise it.
    """
    layer = getattr(model, "quant_conv", None)
    layer = layer if isinstance(layer, torch.nn.Conv2d) else model.encoder.conv_out
    half = layer.out_channels // 2  # moments = (mean, logvar) along channels
    with torch.no_grad():
        layer.bias[half:] = logvar


def build_model(settings: TrainSettings, init: str | Path | None, decoder_only: bool) -> AutoencodingEngine:
    """The model from the config (seeded), optionally loaded from a checkpoint, with the encoder frozen for decoder-only."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = instantiate_from_config(copy.deepcopy(settings.model))
    if init is not None:
        loaded = load_checkpoint(init)
        load_into(model, loaded.state_dict, loaded.path)
    elif settings.init_logvar is not None:
        init_posterior_logvar(model, settings.init_logvar)
    if decoder_only:
        for module in (model.encoder, getattr(model, "quant_conv", None)):
            if module is not None:
                module.requires_grad_(False)
    if settings.gradient_checkpointing and set_gradient_checkpointing(model) == 0:
        raise ConfigError("gradient_checkpointing: the model has no blocks that support it", settings.source)
    model.ema_decay, model.use_ema = settings.ema_decay, True
    model._init_ema()  # shadows only the trainable parameters
    return model.to(memory_format=torch.channels_last) if settings.channels_last else model


def learning_rate(settings: TrainSettings, step: int) -> float:
    """Linear warm-up, then constant or cosine decay to a tenth of the base rate."""
    lr = settings.lr * min(1.0, (step + 1) / max(settings.warmup, 1))
    if settings.schedule == "cosine":
        lr *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step / settings.steps, 1.0)))
    return lr


@torch.no_grad()
def validate(model: AutoencodingEngine, images: list[torch.Tensor], size: int) -> tuple[float, float]:
    """Mean PSNR over the validation images (posterior mode, EMA weights) and the latents' std."""
    model.eval()
    scores, latents = [], []
    with model.ema_scope():
        for img in images:
            x = to_unit(center_crop(img, size))[None]  # [1, 3, H, W]
            mean, _ = model.encode_moments(x).chunk(2, dim=1)  # [1, z, H/8, W/8]
            scores.append(psnr(to_uint8(model.decode(mean)[0]), to_uint8(x[0])))  # as the written PNGs would be
            latents.append(mean.flatten())
    model.train()
    return sum(scores) / len(scores), float(torch.cat(latents).std())


def export_weights(model: AutoencodingEngine, path: Path, metadata: dict[str, str]) -> None:
    """Save the EMA weights (the model's own keys, no EMA buffers) as .safetensors, atomically."""
    with model.ema_scope():
        sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if not k.startswith("model_ema.")}
    atomic_write(path, lambda p: write_safetensors(p, sd, metadata), overwrite=True)


def _save_state(model: AutoencodingEngine, opt: torch.optim.Optimizer, step: int, path: Path) -> None:
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}

    def write(p: Path) -> None:
        try:
            torch.save(state, p)
        except RuntimeError as err:  # torch's zip writer reports a full disk as a RuntimeError
            raise OSError(errno.EIO, f"torch.save failed: {' '.join(str(err).split())[:160]}") from None

    atomic_write(path, write, overwrite=True)


def _load_state(model: AutoencodingEngine, opt: torch.optim.Optimizer, path: Path) -> int:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"], strict=True)
        opt.load_state_dict(state["optimizer"])
        return int(state["step"])
    except (RuntimeError, KeyError, OSError, EOFError) as err:
        raise CheckpointError(f"cannot resume from this training state ({str(err).splitlines()[0]})", path) from None


def _trim_log(path: Path, last_step: int) -> None:
    """Drop log rows written after the checkpoint we resume from (the killed run's unsaved steps)."""
    if not path.exists():
        return
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) <= last_step]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def block_mean_mse(a: torch.Tensor, b: torch.Tensor, size: int) -> torch.Tensor:
    """MSE between the size x size block means of a and b [B, C, H, W]: the part of the error a box resize would see.

    The squared error of an image splits exactly into this (times 1) plus the error inside the blocks;
    weighting it up makes colour and brightness of each block, where a small VAE loses most, count more.
    """
    return ((F.avg_pool2d(a, size) - F.avg_pool2d(b, size)) ** 2).mean()  # [B, C, H/size, W/size] -> []


def ssim_loss(a: torch.Tensor, b: torch.Tensor, size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """1 - mean SSIM of a and b [B, C, H, W] in [-1, 1] (Wang et al. 2004: Gaussian window, valid part, range 1)."""
    a, b = (a + 1) / 2, (b + 1) / 2  # [B, C, H, W] in [0, 1]
    g = torch.exp(-((torch.arange(size, dtype=a.dtype, device=a.device) - size // 2) ** 2) / (2 * sigma**2))
    window = (g[:, None] * g[None]) / g.sum() ** 2  # [size, size], sums to 1
    c = a.shape[1]
    kernel = window.expand(c, 1, size, size)  # one depthwise filter per channel

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=c)  # [B, C, H-size+1, W-size+1]

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    ssim = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return 1 - ssim.mean()


def training_step(
    model: AutoencodingEngine, opt: torch.optim.Optimizer, settings: TrainSettings, x: torch.Tensor, step: int
) -> dict[str, float]:
    """One optimizer step on batch x [B, 3, H, W] in [-1, 1]; returns the loss terms as floats."""
    torch.manual_seed(settings.seed * 1_000_003 + step)  # the posterior sample: a resumed run repeats it
    if settings.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)  # [B, 3, H, W], stored NHWC
    with torch.autocast(x.device.type, dtype=AUTOCAST[settings.precision], enabled=settings.precision != "fp32"):
        _, dec, reg_log = model(x)
    dec = dec.float()  # [B, 3, H, W]; the loss in fp32 whatever the forward ran in
    l1, mse = (dec - x).abs().mean(), ((dec - x) ** 2).mean()
    lowpass = block_mean_mse(dec, x, settings.loss.lowpass_size) if settings.loss.lowpass else torch.zeros(())
    ssim = ssim_loss(dec, x) if settings.loss.ssim else torch.zeros(())
    kl = reg_log.get("kl_loss", torch.zeros((), device=x.device)).float()  # summed over a sample's latent
    loss = (settings.loss.l1 * l1 + settings.loss.mse * mse + settings.loss.lowpass * lowpass + settings.loss.ssim * ssim
            + settings.loss.kl * kl / x[0].numel())
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss became {float(loss)} at step {step + 1}; lower lr or check the data")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    model.on_train_batch_end()
    return {"loss": float(loss.detach()), "l1": float(l1.detach()), "mse": float(mse.detach()), "kl": float(kl.detach()),
            "lowpass": float(lowpass.detach()), "ssim": float(ssim.detach())}


def train(
    settings: TrainSettings,
    out_dir: str | Path,
    *,
    init: str | Path | None = None,
    decoder_only: bool = False,
    device: str = "cpu",
    warn: Callable[[str], None] = print,
    progress: Progress | None = None,
) -> TrainResult:
    """Train (or resume training) as `settings` says; EMA weights land in out_dir/model.safetensors."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out, recursive=False)  # a save cut short by a kill
    train_images = load_folder_images(settings.data.train, settings.data.crop, warn)
    val_images = load_folder_images(settings.data.val, 32, warn) if settings.data.val else []
    model = build_model(settings, init, decoder_only).to(device).train()
    params = [p for p in model.get_autoencoder_params() if p.requires_grad]
    model.optimizer_config = settings.optimizer
    opt = model.instantiate_optimizer_from_config(params, settings.lr, settings.optimizer)
    start = _load_state(model, opt, out / STATE_FILE) if (out / STATE_FILE).exists() else 0
    _trim_log(out / LOG_FILE, start)
    new_log = not (out / LOG_FILE).exists()
    log_file = (out / LOG_FILE).open("a", newline="")
    log = csv.DictWriter(log_file, fieldnames=LOG_FIELDS)
    if new_log:
        log.writeheader()
    began, val_psnr, latent_std = time.time(), None, None
    try:
        for step in range(start, settings.steps):
            lr = learning_rate(settings, step)
            for group in opt.param_groups:
                group["lr"] = lr
            x = random_batch(train_images, settings.data, step, settings.seed).to(device)  # [B, 3, crop, crop]
            terms = training_step(model, opt, settings, x, step)
            done = step + 1
            row: dict[str, Any] = {"step": done, **terms, "lr": lr, "val_psnr": "", "seconds": round(time.time() - began, 2)}
            if val_images and (done % settings.val_every == 0 or done == settings.steps):
                val_psnr, latent_std = validate(model, val_images, settings.data.val_size)
                row["val_psnr"] = round(val_psnr, 3)
            if done % settings.log_every == 0 or row["val_psnr"] != "" or done == settings.steps:
                log.writerow(row)
                log_file.flush()
            if done % settings.checkpoint_every == 0 or done == settings.steps:
                _save_state(model, opt, done, out / STATE_FILE)
                export_weights(model, out / WEIGHTS_FILE, _metadata(settings, model, done, val_psnr, latent_std))
            if progress is not None:
                progress(done, settings.steps, {k: row[k] for k in ("loss", "lr")} | ({"val_psnr": val_psnr} if val_psnr else {}))
    finally:
        log_file.close()
    if start >= settings.steps and not (out / WEIGHTS_FILE).exists():
        export_weights(model, out / WEIGHTS_FILE, _metadata(settings, model, start, None, None))
    result = TrainResult(out, out / WEIGHTS_FILE, max(start, settings.steps), start, val_psnr, latent_std, time.time() - began)
    summary = {"step": result.step, "resumed_from": start, "val_psnr": val_psnr, "latent_std": latent_std,
               "seconds": round(result.seconds, 1), "weights": WEIGHTS_FILE, "decoder_only": decoder_only}
    atomic_write(out / SUMMARY_FILE, lambda p: p.write_text(json.dumps(summary, indent=2) + "\n"), overwrite=True)
    return result


def _metadata(
    settings: TrainSettings, model: torch.nn.Module, step: int, val_psnr: float | None, latent_std: float | None
) -> dict[str, str]:
    meta = {"format": "vaetool.weights", "vaetool_version": __version__, "step": str(step), "ema": "true",
            "train_config": yaml.safe_dump({"model": settings.model, "steps": settings.steps}, sort_keys=False)}
    groups = {m.num_groups for m in model.modules() if isinstance(m, torch.nn.GroupNorm)}
    if groups != {32} and len(groups) == 1:  # not in the weights' shapes: loading by checkpoint alone needs it
        meta["norm_groups"] = str(groups.pop())
    if val_psnr is not None:
        meta["val_psnr"] = f"{val_psnr:.3f}"
    if latent_std is not None:
        meta["latent_std"] = f"{latent_std:.5f}"
    return meta
