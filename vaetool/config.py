"""YAML configs: loading, dotted overrides, and `instantiate_from_config` over an allow-list.

A config never imports an arbitrary module: `target` must be one of TARGETS, which holds
vaetool's own classes and the upstream names (ldm / sgm) that published YAMLs use, mapped onto
vaetool's classes.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vaetool.errors import ConfigError
from vaetool.families import FAMILIES, LatentFormat

_AE = "vaetool.nn.autoencoder"
_CODERS = "vaetool.nn.coders"
_TEMPORAL = "vaetool.nn.temporal"
_REG = "vaetool.nn.distributions:DiagonalGaussianRegularizer"
_WAN = "vaetool.nn.wan"
_FLUX2 = "vaetool.nn.flux2"
_TAESD = "vaetool.nn.taesd"

# target name -> "module:attribute"; only modules inside vaetool (and torch for Identity/optimizers).
TARGETS: dict[str, str] = {
    # vaetool's own short names
    "vaetool.AutoencoderKL": f"{_AE}:AutoencoderKL",
    "vaetool.AutoencodingEngine": f"{_AE}:AutoencodingEngine",
    "vaetool.AutoencodingEngineLegacy": f"{_AE}:AutoencodingEngineLegacy",
    "vaetool.Encoder": f"{_CODERS}:Encoder",
    "vaetool.Decoder": f"{_CODERS}:Decoder",
    "vaetool.VideoDecoder": f"{_TEMPORAL}:VideoDecoder",
    "vaetool.DiagonalGaussianRegularizer": _REG,
    "vaetool.WanVAE": f"{_WAN}:WanVAE",
    "vaetool.Flux2Autoencoder": f"{_FLUX2}:Flux2Autoencoder",
    "vaetool.Flux2Encoder": f"{_FLUX2}:Flux2Encoder",
    "vaetool.Flux2Decoder": f"{_FLUX2}:Flux2Decoder",
    "vaetool.TAESD": f"{_TAESD}:TAESD",
    # upstream names used by published YAMLs
    "ldm.models.autoencoder.AutoencoderKL": f"{_AE}:AutoencoderKL",
    "sgm.models.autoencoder.AutoencoderKL": f"{_AE}:AutoencoderKL",
    "sgm.models.autoencoder.AutoencoderKLInferenceWrapper": f"{_AE}:AutoencoderKL",
    "sgm.models.autoencoder.AutoencodingEngine": f"{_AE}:AutoencodingEngine",
    "sgm.models.autoencoder.AutoencodingEngineLegacy": f"{_AE}:AutoencodingEngineLegacy",
    "sgm.modules.diffusionmodules.model.Encoder": f"{_CODERS}:Encoder",
    "sgm.modules.diffusionmodules.model.Decoder": f"{_CODERS}:Decoder",
    "ldm.modules.diffusionmodules.model.Encoder": f"{_CODERS}:Encoder",
    "ldm.modules.diffusionmodules.model.Decoder": f"{_CODERS}:Decoder",
    "sgm.modules.autoencoding.temporal_ae.VideoDecoder": f"{_TEMPORAL}:VideoDecoder",
    "sgm.modules.autoencoding.regularizers.DiagonalGaussianRegularizer": _REG,
    "torch.nn.Identity": "torch.nn:Identity",
    # optimizers (AbstractAutoencoder builds its optimizer from config)
    "torch.optim.Adam": "torch.optim:Adam",
    "torch.optim.AdamW": "torch.optim:AdamW",
    "torch.optim.SGD": "torch.optim:SGD",
}
# the vaetool classes are also reachable by their full module path
TARGETS |= {spec.replace(":", "."): spec for spec in set(TARGETS.values()) if spec.startswith("vaetool.")}

PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_DIRS: tuple[Path, ...] = (
    Path(__file__).resolve().parent / "configs",  # installed wheel: configs/ is packaged here
    Path(__file__).resolve().parent.parent / "configs",  # source checkout / editable install
)


def resolve_target(target: str) -> Any:
    """The class or function an allowed `target` names; ConfigError listing the allowed ones otherwise."""
    spec = TARGETS.get(target)
    if spec is None:
        allowed = ", ".join(sorted(t for t in TARGETS if not t.startswith("vaetool.nn.")))
        raise ConfigError(f"target {target!r} is not allowed; allowed targets: {allowed}")
    module, attr = spec.split(":")
    return getattr(importlib.import_module(module), attr)


def instantiate_from_config(config: dict[str, Any], **extra: Any) -> Any:
    """Build `target(**params, **extra)`; nested `*_config` dicts are built by the classes themselves."""
    if not isinstance(config, dict) or "target" not in config:
        raise ConfigError(f"expected a mapping with a 'target' key, got {str(config)[:80]!r}")
    params = config.get("params") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"'params' of {config['target']} must be a mapping, got {type(params).__name__}")
    cls = resolve_target(config["target"])
    try:
        return cls(**params, **extra)
    except TypeError as err:
        raise ConfigError(f"cannot build {config['target']}: {err}") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; ConfigError naming the file for a missing, unreadable or non-mapping file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("no such file", path) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read: {err}", path) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"invalid YAML: {str(err).splitlines()[0]}", path) from None
    if not isinstance(data, dict):
        raise ConfigError("a config must be a YAML mapping", path)
    return data


def apply_overrides(config: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys from `key.sub=value` strings (values parsed as YAML); returns the config."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a mapping")
        node[leaf] = yaml.safe_load(raw)
    return config


def find_config_file(name_or_path: str | Path) -> Path:
    """A YAML path as given, or a shipped config by name (`sd1`, `sdxl`, `tiny`, ...)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise ConfigError("no such file", path)
        return path
    for directory in CONFIG_DIRS:
        candidate = directory / f"{name_or_path}.yaml"
        if candidate.exists():
            return candidate
    raise ConfigError(f"no shipped config named {str(name_or_path)!r}; shipped: {', '.join(shipped_configs())}")


def shipped_configs() -> list[str]:
    """Names of the configs that ship with vaetool."""
    names = {p.stem for d in CONFIG_DIRS if d.is_dir() for p in d.glob("*.yaml")}
    return sorted(names)


@dataclass
class VaeConfig:
    """The VAE part of a config file, with the latent format it declares (if any)."""

    model: dict[str, Any]
    latent_format: LatentFormat | None
    source: str
    checkpoint: Path | None = None


def _checkpoint_path(doc: dict[str, Any], source: str) -> Path | None:
    """The `checkpoint:` a config names, relative to the config file or to the vaetool package."""
    value = doc.get("checkpoint")
    if value is None:
        return None
    path = Path(str(value))
    if path.is_absolute():
        return path
    candidates = [Path(source).parent / path, PACKAGE_DIR / path]
    return next((c for c in candidates if c.exists()), candidates[0])


_FIELD_TYPES: dict[str, type] = {"channels": int, "downscale": int, "patch": int, "scale": float, "shift": float}


def _latent_format(doc: dict[str, Any], model_params: dict[str, Any], source: str) -> LatentFormat | None:
    fmt = doc.get("latent_format")
    family = doc.get("family")
    if fmt is None and family is None:
        scale = model_params.get("scale_factor")  # upstream whole-model YAMLs
        return None if scale is None else LatentFormat("unknown", 0, float(scale), 0.0)
    base = FAMILIES.get(str(family).lower()) if family else None
    if family and base is None and fmt is None:
        raise ConfigError(f"unknown family {family!r} and no latent_format given", source)
    fmt = fmt or {}
    if not isinstance(fmt, dict):
        raise ConfigError(f"latent_format must be a mapping, got {type(fmt).__name__}", source)
    fields = (base.as_dict() if base else {"channels": 0, "scale": 1.0}) | fmt
    fields["family"] = str(family or fmt.get("family", "custom"))
    try:
        fields |= {k: _FIELD_TYPES[k](v) for k, v in fields.items() if k in _FIELD_TYPES}
        return LatentFormat.from_dict(fields)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"bad latent_format: {err}", source) from None


def extract_vae_config(doc: dict[str, Any], source: str = "<config>") -> VaeConfig:
    """Find the VAE in a config: a bare VAE config, `model:` of one, or a whole model's first_stage_config."""
    model = doc.get("model", doc)
    if not isinstance(model, dict) or "target" not in model:
        raise ConfigError("no 'target' found (expected a VAE config or a model with first_stage_config)", source)
    params = model.get("params") or {}
    vae = params.get("first_stage_config", model) if isinstance(params, dict) else model
    if not isinstance(vae, dict) or "target" not in vae:
        raise ConfigError("first_stage_config has no 'target'", source)
    fmt = _latent_format(doc, params if vae is not model else {}, source)
    return VaeConfig(model=vae, latent_format=fmt, source=source, checkpoint=_checkpoint_path(doc, source))


def load_vae_config(name_or_path: str | Path, overrides: list[str] | None = None) -> VaeConfig:
    """Load a shipped or user YAML, apply overrides, and return its VAE part."""
    path = find_config_file(name_or_path)
    doc = apply_overrides(load_yaml(path), overrides or [])
    return extract_vae_config(doc, str(path))
