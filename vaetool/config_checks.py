"""Checks of a VAE config before anything is built: each bad value is one ConfigError naming the
config file and the dotted key (`model.params.ddconfig.ch must be a positive integer, not -32`).

Only the VAE's own keys are checked (the rest of a whole-model YAML is never built) and keys the
classes ignore pass, as published YAMLs carry many. The estimated weight count is bounded, so a
three-line config cannot ask for terabytes of weights.
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Callable
from typing import Any

from vaetool.errors import ConfigError
from vaetool.limits import MAX_MODEL_PARAMS

__all__ = ["ATTN_TYPE_NAMES", "check_vae", "target_class"]

# the attn_type names vaetool.nn.blocks.ATTN_TYPES builds (named here so checking a config needs no torch)
ATTN_TYPE_NAMES = ("vanilla", "vanilla-xformers", "memory-efficient-cross-attn", "linear", "none")

Rule = tuple[str, Callable[[Any], bool]]
_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxlevel = 40, 40, 6, 4, 2


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: Any) -> bool:
    return (_int(v) or isinstance(v, float)) and math.isfinite(v)


POSITIVE: Rule = ("a positive integer", lambda v: _int(v) and v > 0)
COUNT: Rule = ("an integer >= 0", lambda v: _int(v) and v >= 0)
FLAG: Rule = ("true or false", lambda v: isinstance(v, bool))
OPTIONAL_POSITIVE: Rule = ("a positive integer or null", lambda v: v is None or (_int(v) and v > 0))
# Encoder / Decoder / VideoDecoder parameters (a `ddconfig` holds them for both coders)
CODER_RULES: dict[str, Rule] = {
    "ch": POSITIVE,
    "out_ch": POSITIVE,
    "in_channels": POSITIVE,
    "z_channels": POSITIVE,
    "resolution": POSITIVE,
    "num_res_blocks": COUNT,
    "norm_groups": POSITIVE,
    "ch_mult": ("a list of 1 to 16 positive integers",
                lambda v: isinstance(v, list | tuple) and 0 < len(v) <= 16 and all(_int(m) and m > 0 for m in v)),
    "attn_resolutions": ("a list of integers", lambda v: isinstance(v, list | tuple) and all(_int(r) for r in v)),
    "dropout": ("a number in [0, 1)", lambda v: _number(v) and 0 <= v < 1),
    "attn_type": (f"one of {', '.join(ATTN_TYPE_NAMES)}", lambda v: isinstance(v, str) and v in ATTN_TYPE_NAMES),
    "double_z": FLAG,
    "use_linear_attn": FLAG,
    "resamp_with_conv": FLAG,
    "give_pre_end": FLAG,
    "tanh_out": FLAG,
}
CODER_REQUIRED = ("ch", "num_res_blocks", "in_channels", "resolution", "z_channels")
ENGINE_RULES: dict[str, Rule] = {
    "embed_dim": OPTIONAL_POSITIVE,
    "max_batch_size": OPTIONAL_POSITIVE,
    "ema_decay": ("a number in [0, 1] or null", lambda v: v is None or (_number(v) and 0 <= v <= 1)),
    "use_quant_conv": FLAG,
    "use_post_quant_conv": FLAG,
}
OWN_CHECKS: tuple[str, ...] = ("WanVAE", "Flux2Autoencoder", "TAESD")  # newer families: their constructors check their params
VAE_CLASSES = ("AutoencoderKL", "AutoencodingEngine", "AutoencodingEngineLegacy", *OWN_CHECKS)
# AutoencodingEngine's sub-configs -> the classes each may name
ROLES: dict[str, tuple[str, ...]] = {
    "encoder_config": ("Encoder",),
    "decoder_config": ("Decoder", "VideoDecoder"),
    "regularizer_config": ("DiagonalGaussianRegularizer",),
}


def _fail(source: str, key: str, what: str, value: Any) -> ConfigError:
    return ConfigError(f"{key} must be {what}, not {_SHORT.repr(value)}", source)


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def target_class(cfg: Any, targets: dict[str, str], source: str, key: str, allowed: tuple[str, ...]) -> str:
    """The class name a `{target, params}` mapping names (through `targets`); ConfigError unless it is one of `allowed`."""
    if not isinstance(cfg, dict):
        raise _fail(source, key or "the config", "a mapping with a 'target' key", cfg)
    target = cfg.get("target")
    if not isinstance(target, str):
        raise _fail(source, _join(key, "target"), "a class name", target)
    spec = targets.get(target)
    name = spec.rsplit(":", 1)[1] if spec else ""
    if name not in allowed:
        fitting = sorted({f"vaetool.{s.rsplit(':', 1)[1]}" for s in targets.values() if s.rsplit(":", 1)[1] in allowed})
        role = "an autoencoder" if allowed == VAE_CLASSES else " or ".join(allowed)
        problem = "is not allowed" if spec is None else f"builds {name}, not {role}"
        raise ConfigError(f"{_join(key, 'target')} {target!r} {problem}; allowed here: {', '.join(fitting)} "
                          "(or their ldm/sgm/comfy names)", source)
    params = cfg.get("params") or {}
    if not isinstance(params, dict):
        raise _fail(source, _join(key, "params"), "a mapping", params)
    return name


def _check_rules(params: dict[str, Any], rules: dict[str, Rule], source: str, key: str) -> None:
    for name, (what, ok) in rules.items():
        if name in params and not ok(params[name]):
            raise _fail(source, _join(key, name), what, params[name])


def _coder_weights(params: dict[str, Any], source: str, key: str, decoder: bool) -> int:
    """Check one coder's parameters; returns a rough count of its conv weights."""
    if not isinstance(params, dict):
        raise _fail(source, key, "a mapping", params)
    for name in (*CODER_REQUIRED, *(("out_ch",) if decoder else ())):
        if name not in params:
            raise ConfigError(f"{_join(key, name)} is missing", source)
    _check_rules(params, CODER_RULES, source, key)
    widths = [params["ch"] * m for m in params.get("ch_mult", (1, 2, 4, 8))]
    groups = params.get("norm_groups", 32)
    if any(w % groups for w in [params["ch"], *widths]):
        raise ConfigError(f"{_join(key, 'norm_groups')} ({groups}) must divide ch and every ch x ch_mult width "
                          f"({', '.join(map(str, widths))})", source)
    return 9 * sum(w * w for w in widths) * (2 * params["num_res_blocks"] + 2)


def check_vae(vae: Any, targets: dict[str, str], source: str, key: str = "") -> None:
    """ConfigError naming `source` and the dotted key of the first bad value in the VAE config found at `key`."""
    name = target_class(vae, targets, source, key, VAE_CLASSES)
    if name in OWN_CHECKS:
        return
    params = vae.get("params") or {}
    pkey = _join(key, "params")
    _check_rules(params, ENGINE_RULES if name == "AutoencodingEngine" else ENGINE_RULES | {"embed_dim": POSITIVE}, source, pkey)
    if name == "AutoencodingEngine":
        for sub in ("encoder_config", "decoder_config"):
            if sub not in params:
                raise ConfigError(f"{_join(pkey, sub)} is missing", source)
        for sub, allowed in ROLES.items():
            if params.get(sub) is not None:
                target_class(params[sub], targets, source, _join(pkey, sub), allowed)
        coders = [(params[s].get("params") or {}, _join(pkey, f"{s}.params"), s == "decoder_config")
                  for s in ("encoder_config", "decoder_config")]
    else:
        for sub in ("embed_dim", "ddconfig"):
            if sub not in params:
                raise ConfigError(f"{_join(pkey, sub)} is missing", source)
        coders = [(params["ddconfig"], _join(pkey, "ddconfig"), True)]
    weights = sum(_coder_weights(p, source, k, decoder) for p, k, decoder in coders)
    if weights > MAX_MODEL_PARAMS:
        raise ConfigError(f"{key or 'the config'} describes a model of about {weights:.1e} weights, more than the limit "
                          f"of {MAX_MODEL_PARAMS:.1e} (check ch, ch_mult and num_res_blocks)", source)
