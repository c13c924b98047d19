"""Autoencoders: the sgm AutoencodingEngine family and the LDM AutoencoderKL, as plain nn.Modules.

AbstractAutoencoder keeps an optional EMA copy of the weights (`ema_scope`) and builds its
optimizer from config; AutoencodingEngine composes encoder, decoder and regularizer from configs;
AutoencodingEngineLegacy / AutoencoderKL add the 1x1 quant convs of the SD1/SD2/SDXL VAEs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from vaetool.nn.ema import LitEma


def _instantiate(cfg: dict[str, Any] | None, **extra: Any) -> Any:
    from vaetool.config import instantiate_from_config  # late: config imports the model classes

    return None if cfg is None else instantiate_from_config(cfg, **extra)


class AbstractAutoencoder(nn.Module):
    """Base of every autoencoder: EMA bookkeeping and the optimizer from config."""

    def __init__(
        self,
        ema_decay: float | None = None,
        monitor: str | None = None,
        input_key: str = "jpg",
        optimizer_config: dict[str, Any] | None = None,
        **ignored: Any,
    ) -> None:
        super().__init__()
        self.input_key, self.monitor = input_key, monitor
        self.ema_decay = ema_decay
        self.use_ema = ema_decay is not None
        self.optimizer_config = optimizer_config or {"target": "torch.optim.Adam"}

    def _init_ema(self) -> None:
        """Create the EMA shadow once the subclass has built its parameters."""
        if self.use_ema:
            self.model_ema = LitEma(self, decay=self.ema_decay)

    def get_input(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The image tensor of a training batch."""
        return batch[self.input_key]

    def on_train_batch_end(self) -> None:
        """Update the EMA after an optimizer step."""
        if self.use_ema:
            self.model_ema(self)

    @contextlib.contextmanager
    def ema_scope(self, context: str | None = None) -> Iterator[None]:
        """Temporarily swap in the EMA weights (no-op without EMA)."""
        if not self.use_ema:
            yield
            return
        params = list(self.parameters())
        self.model_ema.store(params)
        self.model_ema.copy_to(self)
        try:
            yield
        finally:
            self.model_ema.restore(params)

    def instantiate_optimizer_from_config(
        self, params: Any, lr: float, cfg: dict[str, Any]
    ) -> torch.optim.Optimizer:
        """Build the optimizer named by `cfg` (target + params) over `params` with learning rate `lr`."""
        return _instantiate(cfg, params=params, lr=lr)

    def configure_optimizers(self, lr: float) -> torch.optim.Optimizer:
        """The optimizer over the trainable autoencoder parameters."""
        return self.instantiate_optimizer_from_config(self.get_autoencoder_params(), lr, self.optimizer_config)

    def get_autoencoder_params(self) -> list[nn.Parameter]:
        """Every parameter the autoencoder trains."""
        return [p for n, p in self.named_parameters() if not n.startswith("model_ema.")]

    def encode(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError


class AutoencodingEngine(AbstractAutoencoder):
    """Encoder -> (quant_conv) -> regularizer -> (post_quant_conv) -> decoder, each from config.

    `use_quant_conv` / `use_post_quant_conv` are vaetool's additions for checkpoints that carry
    only one of the 1x1 convs (diffusers' SVD temporal decoder has quant_conv but no post_quant_conv).
    """

    def __init__(
        self,
        *,
        encoder_config: dict[str, Any],
        decoder_config: dict[str, Any],
        regularizer_config: dict[str, Any] | None = None,
        loss_config: dict[str, Any] | None = None,
        use_quant_conv: bool = False,
        use_post_quant_conv: bool = False,
        embed_dim: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.encoder = _instantiate(encoder_config)
        self.decoder = _instantiate(decoder_config)
        self.regularization = _instantiate(
            regularizer_config or {"target": "vaetool.DiagonalGaussianRegularizer"}
        )
        self.loss_config = loss_config  # kept, not built: training losses live in vaetool.train
        z_channels = int(encoder_config.get("params", {}).get("z_channels", decoder_config["params"]["z_channels"]))
        double_z = bool(encoder_config.get("params", {}).get("double_z", True))
        self.embed_dim = embed_dim or z_channels
        factor = 2 if double_z else 1
        if use_quant_conv:
            self.quant_conv = nn.Conv2d(factor * z_channels, factor * self.embed_dim, 1)
        if use_post_quant_conv:
            self.post_quant_conv = nn.Conv2d(self.embed_dim, z_channels, 1)
        self._init_ema()

    @property
    def downscale(self) -> int:
        """Image pixels per latent pixel, per side (8 for f8 models)."""
        return 2 ** (self.encoder.num_resolutions - 1)

    def get_last_layer(self) -> torch.Tensor:
        """The decoder's output conv weight."""
        return self.decoder.get_last_layer()

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """Image [B, 3, H, W] in [-1, 1] -> posterior moments [B, 2*embed, H/f, W/f] (mean, logvar)."""
        h = self.encoder(x)
        return self.quant_conv(h) if hasattr(self, "quant_conv") else h

    def encode(
        self,
        x: torch.Tensor,
        return_reg_log: bool = False,
        unregularized: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Encode to a latent via the regularizer (a sample or the mode); optionally with its log."""
        z = self.encode_moments(x)
        if unregularized:
            return z, {}
        z, reg_log = self.regularization(z)
        return (z, reg_log) if return_reg_log else z

    def decode(self, z: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Latent [B, embed, h, w] -> image [B, 3, h*f, w*f]; kwargs (e.g. timesteps) go to the decoder."""
        if hasattr(self, "post_quant_conv"):
            z = self.post_quant_conv(z)
        return self.decoder(z, **kwargs)

    def forward(
        self, x: torch.Tensor, **additional_decode_kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        z, reg_log = self.encode(x, return_reg_log=True)
        dec = self.decode(z, **additional_decode_kwargs)
        return z, dec, reg_log


class AutoencodingEngineLegacy(AutoencodingEngine):
    """The SD1/SD2/SDXL layout: one `ddconfig` for both coders and both 1x1 quant convs.

    `max_batch_size` encodes/decodes in chunks of that many images to bound memory.
    """

    def __init__(self, embed_dim: int, ddconfig: dict[str, Any], max_batch_size: int | None = None, **kwargs: Any) -> None:
        for upstream_only in ("ckpt_path", "ckpt_engine", "ignore_keys", "image_key", "colorize_nlabels"):
            kwargs.pop(upstream_only, None)
        self.max_batch_size = max_batch_size
        super().__init__(
            encoder_config={"target": "vaetool.Encoder", "params": ddconfig},
            decoder_config={"target": "vaetool.Decoder", "params": ddconfig},
            use_quant_conv=True,
            use_post_quant_conv=True,
            embed_dim=embed_dim,
            **kwargs,
        )

    def _chunks(self, x: torch.Tensor) -> list[torch.Tensor]:
        n = self.max_batch_size or x.shape[0]
        return list(torch.split(x, n)) if x.shape[0] else [x]

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """Image -> moments, `max_batch_size` images at a time."""
        return torch.cat([self.quant_conv(self.encoder(c)) for c in self._chunks(x)])

    def decode(self, z: torch.Tensor, **decoder_kwargs: Any) -> torch.Tensor:
        """Latent -> image, `max_batch_size` latents at a time."""
        return torch.cat([self.decoder(self.post_quant_conv(c), **decoder_kwargs) for c in self._chunks(z)])


class AutoencoderKL(AutoencodingEngineLegacy):
    """The KL autoencoder of `ldm.models.autoencoder.AutoencoderKL` / sgm's AutoencoderKL configs."""

    def __init__(self, **kwargs: Any) -> None:
        if "lossconfig" in kwargs:
            kwargs["loss_config"] = kwargs.pop("lossconfig")
        kwargs.setdefault("regularizer_config", {"target": "vaetool.DiagonalGaussianRegularizer"})
        super().__init__(**kwargs)
