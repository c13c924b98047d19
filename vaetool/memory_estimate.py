"""Peak-memory estimates of encode and decode, from the model's structure (see vaetool.memory for the planner).

The estimate walks the coder as a chain of steps (conv, res block, attention, up/downsample,
output head: vaetool.memory_steps reads the LDM coders', vaetool.memory_archs those of Wan, Flux.2
and TAESD) and, for each step, counts the tensors alive at its worst moment in units of one
activation [B, C, h, w] at that step's resolution, exactly as the forward code allocates and frees
them (inference mode, no autograd). Two constants are calibrated by measured peak RSS on CPU
(bench/calibrate_memory.py, docs/memory.md): CONV_WORKSPACE (oneDNN copies a conv's input into its
blocked layout) and SAFETY (a margin so the estimate errs high). Weights and the caller's input
tensor are included.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from vaetool.devices import conv_memory_format
from vaetool.memory_archs import ARCHITECTURES, STEP_COSTS
from vaetool.memory_steps import ATTN_KINDS, FF_WIDTH, HALF_DECODE_RETAINED, Arch, Step, attention_bytes, decoder_steps, encoder_steps
from vaetool.nn import attention as attn
from vaetool.nn import banded

__all__ = ["Arch", "Direction", "Step", "TileMode", "architecture", "estimate_peak", "estimate_tile_peak"]

Direction = Literal["encode", "decode"]  # which half of the autoencoder runs
TileMode = Literal["exact", "fast"]

CONV_WORKSPACE: dict[str, float] = {"cpu": 1.0, "cuda": 0.5, "mps": 1.0}  # x conv input; cuda/mps not measured
NHWC_WORKSPACE = 0.0  # NHWC weights (devices.conv_memory_format): oneDNN convolves the NHWC input as it is, no copy
SAFETY = 1.1  # calibrated: every measured CPU point lies below the estimate (docs/memory.md)
FAST_HALO = 0.125  # fast tiling context on each side, as a share of the tile (image pixels)
EXACT_HALO = 2  # exact tiling halo per stage, in pixels of that stage's resolution


def _build_meta(cfg: dict[str, Any]) -> nn.Module:
    from vaetool.config import instantiate_from_config
    from vaetool.nn.coders import Decoder, Encoder

    with torch.device("meta"):
        if "target" in cfg:
            return instantiate_from_config(cfg)
        dd = cfg.get("ddconfig", cfg)  # AutoencoderKL params, or a bare ddconfig
        model = nn.Module()
        model.encoder, model.decoder = Encoder(**dd), Decoder(**dd)
        z = int(dd["z_channels"])
        model.quant_conv, model.post_quant_conv = nn.Conv2d(2 * z, 2 * z, 1), nn.Conv2d(z, z, 1)
        return model


def architecture(model_or_cfg: Any) -> Arch:
    """The Arch of a Vae, an AutoencodingEngine-like module, a shipped config name, or a config/ddconfig dict."""
    if isinstance(model_or_cfg, Arch):
        return model_or_cfg
    model = getattr(model_or_cfg, "model", model_or_cfg)
    if isinstance(model, (str, Path)):
        from vaetool.config import load_vae_config

        model = load_vae_config(model).model
    if isinstance(model, dict):
        model = _build_meta(model)
    family = ARCHITECTURES.get(type(model))
    if family is not None:  # Wan, Flux.2, TAESD
        return family(model)
    enc, dec = model.encoder, model.decoder
    quant, post_quant = getattr(model, "quant_conv", None), getattr(model, "post_quant_conv", None)
    levels = enc.num_resolutions - 1

    def count(*mods: nn.Module | None) -> int:
        return sum(p.numel() for m in mods if m is not None for p in m.parameters())

    decode_weights = count(dec, post_quant)
    return Arch(
        encode=tuple(encoder_steps(enc, quant)),
        decode=tuple(decoder_steps(dec, post_quant, levels)),
        weights={"encode": count(enc, quant), "decode": decode_weights},
        downscale=2**levels,
        in_channels=enc.conv_in.in_channels,
        latent_channels=dec.conv_in.in_channels if post_quant is None else post_quant.in_channels,
        half_overhead={"decode": int(HALF_DECODE_RETAINED * decode_weights)},
    )


# ---------------------------------------------------------------- per-step costs


def _step_cost(st: Step, hw: tuple[int, int], b: int, elem: int, ctx: dict[str, Any]) -> tuple[int, int]:
    """(bytes alive at the step's worst moment beyond its input, bytes of its output) for input size hw."""
    family_cost = STEP_COSTS.get(st.kind)
    if family_cost is not None:  # the kinds of the Wan, Flux.2 and TAESD coders (vaetool.memory_archs)
        return family_cost(st, hw, b, elem, ctx)
    px = hw[0] * hw[1]
    ws = ctx["ws"]

    def act(c: float, area: float = px) -> float:  # one activation [b, c, h, w]
        return b * c * area * elem

    ci, co = act(st.cin), act(st.cout)
    if st.banded and ctx.get("banded", True):
        cost = _banded_cost(st, hw, b, elem, ctx, ci, co)
        if cost is not None:
            return cost
    if st.kind == "conv":
        return int(co + ws * ci), int(co)
    if st.kind in ("res", "vres"):
        short = (co + ws * ci) if st.cin != st.cout else 0.0
        peak = max(2 * ci, ci + co + ws * ci, 3 * co + ws * co, 2 * co + short, 3 * co)
        if st.kind == "vres":  # the temporal stack after the spatial block (not calibrated)
            peak = max(peak, 5 * co + ws * co)
        return int(peak), int(co)
    if st.kind in ("attn", "vattn"):
        work = attention_bytes(ctx["attention"], b, px, st.cin, elem, ctx["device"])
        peak = max(4 * ci + ws * ci, 5 * ci + work, 6 * ci)
        if st.kind == "vattn":  # then a transformer block across frames (one clip of b frames at worst), not calibrated
            frames = attention_bytes(ctx["attention"], px, b, st.cin, elem, ctx["device"])
            peak = max(peak, 3 * ci + max(5 * ci + frames, FF_WIDTH * ci))
        return int(peak), int(ci)
    if st.kind in ("xattn", "xvattn"):  # x, the tokens, then per block attention or feed-forward (not calibrated)
        tok = act(st.inner)
        d = st.inner // st.heads
        work = attention_bytes(ctx["attention"], b * st.heads, px, d, elem, ctx["device"])
        frames = attention_bytes(ctx["attention"], px * st.heads, b, d, elem, ctx["device"]) if st.kind == "xvattn" else 0
        kept = ci + tok * (3 if st.kind == "xvattn" else 1)  # the video variant keeps the spatial tokens and the mix
        return int(kept + max(5 * tok + max(work, frames), FF_WIDTH * tok, ws * ci + tok)), int(ci)
    if st.kind == "up":
        return int(8 * ci + 4 * ws * ci), int(4 * ci)
    if st.kind == "down":
        pad = act(st.cin, (hw[0] + 1) * (hw[1] + 1))
        out = act(st.cout, math.ceil(hw[0] / 2) * math.ceil(hw[1] / 2))
        return int(pad + out + ws * pad), int(out)
    if st.kind == "head":
        return int(max(2 * ci, ci + co + ws * ci)), int(co)
    return int(co), int(co)  # copy (torch.cat of the chunks)


def _banded_cost(st: Step, hw: tuple[int, int], b: int, elem: int, ctx: dict[str, Any], ci: float, co: float) -> tuple[int, int] | None:
    """A step run row-banded (vaetool.nn.banded; None where `banded.bands` says it runs plainly): its output plus a few bands.

    A band is about BAND_BYTES of normalised input (at least 4 rows), and two bands' tensors can be
    alive at once (the next is made before the last is dropped). res: the first conv's output and
    the bands' inputs, conv outputs and workspace, then in place the second conv's and the
    shortcut's bands (a 1x1 shortcut copies its strided input band); up: the 4x output, the padded bands and the phases' outputs.
    """
    def band(c: int) -> float:  # one band's normalised input [band_batch, c, rows + 2, w + 2]
        return max(banded.BAND_BYTES, 4 * banded.band_batch(b, ctx["nhwc"]) * c * (hw[1] + 2) * elem)

    def runs(nbytes: float) -> bool:  # the rule the forward applies (vaetool.nn.banded.applies)
        return banded.bands(nbytes, ctx["device"].type)

    ws = ctx["ws"]
    if st.kind == "res" and runs(ci):
        first = band(st.cin) * (2 + ws + 2 * st.cout / st.cin)
        second = band(st.cout) * (5 + ws + (2 * st.cin / st.cout if st.cin != st.cout else 0))  # + the 1x1 shortcut's input bands
        return int(co + max(first, second)), int(co)
    if st.kind == "up" and runs(4 * ci):
        return int(4 * co + band(st.cin) * (2 + ws + 2 * st.cout / st.cin)), int(4 * co)
    if st.kind == "head" and runs(ci):
        return int(co + band(st.cin) * (2 + ws) + 2 * band(st.cout)), int(co)
    return None


def _size(height: int, width: int, level: int) -> tuple[int, int]:
    return math.ceil(height / 2**level), math.ceil(width / 2**level)


def _elem(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def _ctx(device: str | torch.device, attention: str | None, dtype: torch.dtype) -> dict[str, Any]:
    device = torch.device(device)
    nhwc = conv_memory_format(device, dtype) == torch.channels_last
    ws = NHWC_WORKSPACE if nhwc else CONV_WORKSPACE.get(device.type, 1.0)
    return {"device": device, "ws": ws, "nhwc": nhwc, "attention": attention or attn.current_attention()}


def _chain_peak(steps: tuple[Step, ...], sizes: Callable[[Step], tuple[int, int]], b: int, elem: int, ctx: dict[str, Any]) -> int:
    """Peak bytes of running `steps` in order, each step's input freed once the next one has its output."""
    live = peak = 0  # the first input is the caller's tensor, counted separately
    for st in steps:
        extra, out = _step_cost(st, sizes(st), b, elem, ctx)
        peak = max(peak, live + extra)
        live = out
    return peak


def _fixed_bytes(arch: Arch, op: Direction, height: int, width: int, batch: int, elem: int, ctx: dict[str, Any]) -> int:
    """The weights, the per-call overhead (and a half call's on the CPU) and the caller's input."""
    half = arch.half_overhead.get(op, 0) if elem < 4 and ctx["device"].type == "cpu" else 0
    return (arch.weights[op] + arch.overhead.get(op, 0) + half) * elem + _input_bytes(arch, op, height, width, batch, elem)


def _check(op: str, height: int, width: int, batch: int) -> None:
    if op not in ("encode", "decode"):
        raise ValueError(f"op must be 'encode' or 'decode', got {op!r}")
    if min(height, width, batch) < 1:
        raise ValueError(f"height, width and batch must be at least 1, got {height}, {width}, {batch}")


def _input_bytes(arch: Arch, op: Direction, height: int, width: int, batch: int, elem: int) -> int:
    if op == "encode":
        return batch * arch.in_channels * height * width * elem
    f = arch.downscale
    return batch * arch.latent_channels * math.ceil(height / f) * math.ceil(width / f) * elem


def estimate_peak(
    model_or_cfg: Any,
    op: Direction,
    height: int,
    width: int,
    batch: int = 1,
    dtype: torch.dtype = torch.float32,
    *,
    device: str | torch.device = "cpu",
    attention: str | None = None,
) -> int:
    """Peak bytes of an untiled encode or decode of `batch` images of height x width IMAGE pixels (weights included)."""
    _check(op, height, width, batch)
    arch, elem = architecture(model_or_cfg), _elem(dtype)
    ctx = _ctx(device, attention, dtype)
    chain = _chain_peak(arch.__dict__[op], lambda st: _size(height, width, st.level), batch, elem, ctx)
    fixed = _fixed_bytes(arch, op, height, width, batch, elem, ctx)
    return int(SAFETY * (chain + fixed))


UP_KINDS = frozenset({"up", "wup", "tup"})  # steps that double the resolution
DOWN_KINDS = frozenset({"down", "sconv"})  # steps that halve it


def _fast_peak(
    steps: tuple[Step, ...],
    op: Direction,
    tile_hw: Callable[[Step], tuple[int, int]],
    full_hw: Callable[[Step], tuple[int, int]],
    b: int,
    elem: int,
    ctx: dict[str, Any],
    full_out: int,
    scale: float = 1.0,
) -> int:
    """Fast mode (vaetool.tiling.fast): the latent-resolution part runs on the whole latent, the rest tile by tile.

    decode: the head (up to the first upsample) on the whole latent, then the tiles with its output
    held and the float32 blend buffer of the full output; encode: the tiles with the float32 blend
    buffer of their latent-resolution output held, then the tail on the whole latent.
    """
    if op == "decode":
        cut = next((i for i, st in enumerate(steps) if st.kind in UP_KINDS), len(steps))
        whole, tiled = steps[:cut], steps[cut:]
    else:
        cut = max((i + 1 for i, st in enumerate(steps) if st.kind in DOWN_KINDS), default=0)
        tiled, whole = steps[:cut], steps[cut:]
    whole_peak = _chain_peak(whole, full_hw, b, elem, ctx)
    tiled_peak = int(scale * _chain_peak(tiled, tile_hw, b, elem, ctx))
    if not whole or not tiled:
        return max(whole_peak, tiled_peak) + full_out
    cross = whole[0] if op == "encode" else tiled[0]
    hw = full_hw(cross)
    held = b * cross.cin * hw[0] * hw[1] * elem  # the tensor crossing the cut, at the whole latent's size
    if op == "decode":
        blend = full_out * 4 // elem  # float32 accumulator
        return max(whole_peak, held + tiled_peak + blend, blend + 2 * full_out)
    blend = held * 4 // elem
    return max(blend + tiled_peak, blend + held, held + whole_peak)


def estimate_tile_peak(
    model_or_cfg: Any,
    op: Direction,
    tile: int,
    batch: int = 1,
    dtype: torch.dtype = torch.float32,
    mode: TileMode = "fast",
    *,
    height: int | None = None,
    width: int | None = None,
    halo: int | None = None,
    device: str | torch.device = "cpu",
    attention: str | None = None,
) -> int:
    """Peak bytes of a tiled op with `tile` x `tile` IMAGE-pixel tiles (height/width: the whole image, default one tile).

    fast: one tile plus `halo` context on each side (default FAST_HALO * tile) through the
    full-resolution part, the latent-resolution part on the whole latent (`_fast_peak`), plus the
    caller's input and the full output buffer. exact: the tiles advance together
    block by block; at each block the device holds one tile's working set (EXACT_HALO pixels of
    context) and, on CPU, the full-size stored activations that block reads and writes (its input
    and output); on an accelerator those live in host memory and are not counted. The mid-block
    attention always runs on the whole latent.
    """
    height, width = height or tile, width or tile
    _check(op, height, width, min(batch, tile))
    arch, elem = architecture(model_or_cfg), _elem(dtype)
    ctx = _ctx(device, attention, dtype)
    steps = arch.__dict__[op]
    fixed = _fixed_bytes(arch, op, height, width, batch, elem, ctx)
    full_out = _step_cost(steps[-1], _size(height, width, steps[-1].level), batch, elem, ctx)[1]

    def tile_size(st: Step, context: int) -> tuple[int, int]:
        th, tw = _size(min(tile, height), min(tile, width), st.level)
        return th + 2 * context, tw + 2 * context

    if mode == "fast":
        pad = math.ceil((FAST_HALO * tile if halo is None else halo) / arch.downscale) * arch.downscale
        peak = _fast_peak(steps, op, lambda st: tile_size(st, pad // 2**st.level), lambda st: _size(height, width, st.level),
                          batch, elem, ctx, full_out, arch.tile_scale)  # fmt: skip
    else:
        on_host = ctx["device"].type == "cpu"
        ctx = ctx | {"banded": False}  # exact tiles run the tiling program's ops, never the banded forward
        peak = 0
        for st in steps:
            full_hw = _size(height, width, st.level)
            if st.kind in ATTN_KINDS:  # global: on the whole latent, which is held in full
                extra, out = _step_cost(st, full_hw, batch, elem, ctx)
                peak = max(peak, extra + out)
                continue
            extra, _ = _step_cost(st, tile_size(st, EXACT_HALO), batch, elem, ctx)
            extra = int(arch.tile_scale * extra)
            stored = 0
            if on_host:
                inp = batch * st.cin * full_hw[0] * full_hw[1] * elem
                out = _step_cost(st, full_hw, batch, elem, ctx)[1]
                band = out * min(1.0, tile / height)  # a row of output tiles while it is joined into its band
                stored = int(inp + out + band)  # vaetool.tiling.exact keeps about two full-size activations
            peak = max(peak, stored + extra)
        peak += full_out
    return int(SAFETY * (peak + fixed))
