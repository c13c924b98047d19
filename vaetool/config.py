"""YAML configs: loading, dotted overrides, and `instantiate_from_config` over an allow-list.

A config never imports an arbitrary module: `target` must be one of TARGETS, which holds
vaetool's own classes and the upstream names (ldm / sgm) that published YAMLs use, mapped onto
vaetool's classes. YAML is read with PyYAML's safe loader, its node graph checked before any
value is built: aliases that would expand past MAX_CONFIG_NODES values (a "billion laughs"
file) or refer to themselves are refused, as are files over MAX_CONFIG_BYTES. The VAE part of a
config is checked key by key (config_checks) before it is built.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vaetool.config_checks import check_vae
from vaetool.errors import ConfigError, first_line
from vaetool.families import FAMILIES, LatentFormat
from vaetool.limits import MAX_CONFIG_BYTES, MAX_CONFIG_NODES

_AE = "vaetool.nn.autoencoder"
_BLOCKS = "vaetool.nn.blocks"
_CODERS = "vaetool.nn.coders"
_TEMPORAL = "vaetool.nn.temporal"
_DIST = "vaetool.nn.distributions"
_XF = "vaetool.nn.transformer"
_ST = "vaetool.nn.spatial_transformer"
_WAN = "vaetool.nn.wan"
_FLUX2 = "vaetool.nn.flux2"
_TAESD = "vaetool.nn.taesd"

# The upstream code bases whose YAMLs vaetool reads: CompVis ldm, Stability sgm, and the ComfyUI
# copy the seeds describe (`comfy.*`, and its Forge/Fooocus fork `ldm_patched.*`).
_COMFY = ("comfy", "ldm_patched")
_DIFFUSIONMODULES_MODEL = ("ldm.modules.diffusionmodules.model", "sgm.modules.diffusionmodules.model",
                           *(f"{c}.ldm.modules.diffusionmodules.model" for c in _COMFY))
_ATTENTION = ("ldm.modules.attention", "sgm.modules.attention", *(f"{c}.ldm.modules.attention" for c in _COMFY))
_TEMPORAL_AE = ("sgm.modules.autoencoding.temporal_ae", *(f"{c}.ldm.modules.temporal_ae" for c in _COMFY))
_AUTOENCODER = ("sgm.models.autoencoder", *(f"{c}.ldm.models.autoencoder" for c in _COMFY))
_UTIL = tuple(f"{c}.ldm.modules.diffusionmodules.util" for c in _COMFY)

# "module:Class" -> the upstream modules that define a class of that name
UPSTREAM: dict[str, tuple[str, ...]] = {
    f"{_AE}:AutoencoderKL": ("ldm.models.autoencoder", *_AUTOENCODER),
    f"{_AE}:AutoencodingEngine": _AUTOENCODER,
    f"{_AE}:AutoencodingEngineLegacy": _AUTOENCODER,
    f"{_CODERS}:Encoder": _DIFFUSIONMODULES_MODEL,
    f"{_CODERS}:Decoder": _DIFFUSIONMODULES_MODEL,
    "vaetool.nn.unet:Model": _DIFFUSIONMODULES_MODEL,
    f"{_BLOCKS}:ResnetBlock": _DIFFUSIONMODULES_MODEL,
    f"{_BLOCKS}:AttnBlock": _DIFFUSIONMODULES_MODEL,
    f"{_TEMPORAL}:VideoDecoder": _TEMPORAL_AE,
    f"{_TEMPORAL}:VideoResBlock": _TEMPORAL_AE,
    f"{_TEMPORAL}:AE3DConv": _TEMPORAL_AE,
    f"{_TEMPORAL}:AttnVideoBlock": _TEMPORAL_AE,
    f"{_XF}:CrossAttention": _ATTENTION,
    f"{_XF}:BasicTransformerBlock": _ATTENTION,
    f"{_ST}:SpatialTransformer": _ATTENTION,
    f"{_ST}:SpatialVideoTransformer": ("sgm.modules.video_attention", *(f"{c}.ldm.modules.attention" for c in _COMFY)),
    f"{_DIST}:DiagonalGaussianRegularizer": ("sgm.modules.autoencoding.regularizers", *(f"{c}.ldm.models.autoencoder" for c in _COMFY)),
    f"{_DIST}:IdentityRegularizer": ("sgm.modules.autoencoding.regularizers",),
    "vaetool.nn.blending:AlphaBlender": ("sgm.modules.diffusionmodules.util", *_UTIL),
    "vaetool.nn.conditioning:HybridConditioner": ("ldm.modules.diffusionmodules.util", *_UTIL),
    # the newer families: no upstream YAML targets exist; vaetool's own names only
    f"{_WAN}:WanVAE": (),
    f"{_FLUX2}:Flux2Autoencoder": (),
    f"{_FLUX2}:Flux2Encoder": (),
    f"{_FLUX2}:Flux2Decoder": (),
    f"{_TAESD}:TAESD": (),
}

# target name -> "module:attribute"; only modules inside vaetool (and torch for Identity/optimizers).
TARGETS: dict[str, str] = {
    # vaetool's own short names: vaetool.<Class>
    **{f"vaetool.{spec.split(':')[1]}": spec for spec in UPSTREAM},
    # upstream names used by published YAMLs
    **{f"{module}.{spec.split(':')[1]}": spec for spec, modules in UPSTREAM.items() for module in modules},
    "sgm.models.autoencoder.AutoencoderKLInferenceWrapper": f"{_AE}:AutoencoderKL",
    "torch.nn.Identity": "torch.nn:Identity",
    "torch.nn.Conv2d": "torch.nn:Conv2d",
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
        shown = sorted(t for t in TARGETS if not t.startswith(("vaetool.nn.", *(f"{c}." for c in _COMFY))))
        raise ConfigError(f"target {target!r} is not allowed; allowed targets: {', '.join(shown)} "
                          f"(and the comfy.* / ldm_patched.* names of the same classes)")
    module, attr = spec.split(":")
    return getattr(importlib.import_module(module), attr)


def _describe(value: Any) -> str:
    """A short description of a config value (never its whole text: an alias bomb would expand)."""
    if isinstance(value, dict):
        keys = [str(k)[:40] for k in list(value)[:5]]
        return f"a mapping with keys {', '.join(keys) or 'none'}{', ...' if len(value) > 5 else ''}"
    return f"a {type(value).__name__}"


# what a class may raise when a config gives it a value of the right type but an impossible size
BUILD_ERRORS = (TypeError, ValueError, RuntimeError, ZeroDivisionError, IndexError, KeyError, AttributeError, OverflowError)


def instantiate_from_config(config: dict[str, Any], **extra: Any) -> Any:
    """Build `target(**params, **extra)`; nested `*_config` dicts are built by the classes themselves."""
    if not isinstance(config, dict) or "target" not in config:
        raise ConfigError(f"expected a mapping with a 'target' key, got {_describe(config)}")
    target = config["target"]
    if not isinstance(target, str):
        raise ConfigError(f"'target' must be a class name, not {_describe(target)}")
    params = config.get("params") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"'params' of {target} must be a mapping, got {type(params).__name__}")
    cls = resolve_target(target)
    try:
        return cls(**params, **extra)
    except BUILD_ERRORS as err:
        raise ConfigError(f"cannot build {target}: {first_line(err)}") from None


def _expanded_size(node: yaml.Node, sizes: dict[int, int], active: set[int]) -> int:
    """How many values a YAML node stands for once aliases are expanded (capped just past the limit)."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in active:
        raise ValueError("an alias refers to itself (a recursive alias)")
    active.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    else:
        children = []
    total = 1
    for child in children:
        total = min(total + _expanded_size(child, sizes, active), MAX_CONFIG_NODES + 1)
    active.discard(id(node))
    sizes[id(node)] = total
    return total


def parse_yaml(text: str) -> Any:
    """YAML text -> Python values with the safe loader, refusing alias bombs and recursive aliases (ValueError)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)(text)  # libyaml when present: 10x faster
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}, set()) > MAX_CONFIG_NODES:
            raise ValueError(f"its aliases expand to more than {MAX_CONFIG_NODES} values (an alias bomb?)")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; ConfigError naming the file for a missing, unreadable, hostile or non-mapping file."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"a {path.stat().st_size}-byte config is over the {MAX_CONFIG_BYTES}-byte limit", path)
        data = parse_yaml(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("no such file", path) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read: {first_line(err)}", path) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"invalid YAML: {str(err).splitlines()[0]}", path) from None
    except RecursionError:
        raise ConfigError("invalid YAML: nested too deeply", path) from None
    except ValueError as err:
        raise ConfigError(f"refusing the YAML: {err}", path) from None
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
        try:
            node[leaf] = parse_yaml(raw)
        except (yaml.YAMLError, ValueError, RecursionError) as err:
            raise ConfigError(f"override {item[:80]!r}: {first_line(err)}") from None
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
    names = shipped_configs()
    close = difflib.get_close_matches(str(name_or_path), names, n=3, cutoff=0.6)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    recipes = [n for n in names if _is_shipped_recipe(n)]
    models = [n for n in names if n not in recipes]
    listed = f"shipped models: {', '.join(models)}" + (f"; training recipes (vaetool train): {', '.join(recipes)}" if recipes else "")
    raise ConfigError(f"no shipped config named {str(name_or_path)!r}{hint}; {listed}")


def _is_shipped_recipe(name: str) -> bool:
    for directory in CONFIG_DIRS:
        if (path := directory / f"{name}.yaml").exists():
            try:
                return is_recipe(load_yaml(path))
            except ConfigError:
                return False
    return False


RECIPE_KEYS = ("data", "optimizer", "steps")  # keys only a training recipe has


def is_recipe(doc: dict[str, Any]) -> bool:
    """Whether a YAML document is a `vaetool train` recipe rather than a model config."""
    return isinstance(doc.get("model"), str) or any(k in doc for k in RECIPE_KEYS)


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
    test_model: bool = False  # `test_model: true`: random weights are this config's purpose (tiny-* configs)


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
        try:
            return None if scale is None else LatentFormat("unknown", 0, float(scale), 0.0)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"model.params.scale_factor: {first_line(err)}", source) from None
    if family is not None and not isinstance(family, str):
        raise ConfigError(f"family must be a family name, not a {type(family).__name__}", source)
    base = FAMILIES.get(family.lower()) if family else None
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
    except (TypeError, ValueError, OverflowError) as err:
        raise ConfigError(f"latent_format: {first_line(err)}", source) from None


def extract_vae_config(doc: dict[str, Any], source: str = "<config>") -> VaeConfig:
    """Find the VAE in a config: a bare VAE config, `model:` of one, or a whole model's first_stage_config.

    Every value of the VAE part is checked here (config_checks), so a bad one is a ConfigError
    naming the file and its key before anything is built.
    """
    key = "model" if "model" in doc else ""
    model = doc.get("model", doc)
    if not isinstance(model, dict) or "target" not in model:
        raise ConfigError("no 'target' found (expected a VAE config or a model with first_stage_config)", source)
    params = model.get("params") or {}
    if isinstance(params, dict) and "first_stage_config" in params:
        vae, key = params["first_stage_config"], f"{key}.params.first_stage_config".lstrip(".")
        if not isinstance(vae, dict) or "target" not in vae:
            raise ConfigError("first_stage_config has no 'target'", source)
    else:
        vae = model
    check_vae(vae, TARGETS, source, key)
    fmt = _latent_format(doc, params if vae is not model else {}, source)
    test_model = doc.get("test_model", False)
    if not isinstance(test_model, bool):
        raise ConfigError(f"test_model must be true or false, got {test_model!r}", source)
    return VaeConfig(model=vae, latent_format=fmt, source=source, checkpoint=_checkpoint_path(doc, source), test_model=test_model)


def load_vae_config(name_or_path: str | Path, overrides: list[str] | None = None) -> VaeConfig:
    """Load a shipped or user YAML, apply overrides, and return its VAE part."""
    path = find_config_file(name_or_path)
    doc = apply_overrides(load_yaml(path), overrides or [])
    return extract_vae_config(doc, str(path))
