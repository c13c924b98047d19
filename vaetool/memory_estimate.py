"""Peak-memory estimates of encode and decode, from the model's structure (see vaetool.memory for the planner).

The estimate walks the coder (Encoder or Decoder) as a chain of steps (conv, res block, attention,
up/downsample, output head) and, for each step, counts the tensors alive at its worst moment in
units of one activation [B, C, h, w] at that step's resolution, exactly as the forward code
allocates and frees them (inference mode, no autograd). Two constants are calibrated by measured
peak RSS on CPU (bench/calibrate_memory.py, docs/memory.md): CONV_WORKSPACE (oneDNN copies a conv's
input into its blocked layout) and SAFETY (a margin so the estimate errs high). Weights and the
caller's input tensor are included.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from vaetool.nn import attention as attn

Direction = Literal["encode", "decode"]  # which half of the autoencoder runs
TileMode = Literal["exact", "fast"]

CONV_WORKSPACE: dict[str, float] = {"cpu": 1.0, "cuda": 0.5, "mps": 1.0}  # x conv input; cuda/mps not measured
SAFETY = 1.1  # calibrated: every measured CPU point lies below the estimate (docs/memory.md)
FAST_HALO = 0.125  # fast tiling context on each side, as a share of the tile (image pixels)
EXACT_HALO = 2  # exact tiling halo per stage, in pixels of that stage's resolution


# ---------------------------------------------------------------- the network as a chain of steps


@dataclass(frozen=True)
class Step:
    """One block of the coder: `level` is log2 of its input's downscale from the image.

    Transformer attention blocks (xattn: a SpatialTransformer as the decoder's attn_op, xvattn its
    video variant) also carry their heads, inner width and depth.
    """

    kind: str  # conv | res | vres | attn | vattn | xattn | xvattn | up | down | head | copy
    cin: int
    cout: int
    level: int
    heads: int = 1
    inner: int = 0
    depth: int = 1


ATTN_KINDS = frozenset({"attn", "vattn", "xattn", "xvattn"})  # global steps: they run on the whole map
FF_WIDTH = 17  # a GEGLU feed-forward holds ~17 token widths at its peak (LN, 8x projection, 4x gelu, 4x product)


@dataclass(frozen=True)
class Arch:
    """What the estimate needs of a model: the chains of both coders, their weights, the downscale."""

    encode: tuple[Step, ...]
    decode: tuple[Step, ...]
    weights: dict[str, int]  # parameters per op
    downscale: int
    in_channels: int
    latent_channels: int


def _res_kind(block: nn.Module) -> str:
    return "vres" if hasattr(block, "time_stack") else "res"


def _attn_step(block: nn.Module, channels: int, level: int) -> Step | None:
    """The Step of one attention block, told apart by structure (AttnBlock, AttnVideoBlock, the spatial transformers)."""
    if hasattr(block, "transformer_blocks"):
        attn1 = block.transformer_blocks[0].attn1
        kind = "xvattn" if hasattr(block, "time_stack") else "xattn"
        return Step(kind, channels, channels, level, attn1.heads, attn1.heads * attn1.dim_head, len(block.transformer_blocks))
    if hasattr(block, "time_mix_block"):
        return Step("vattn", channels, channels, level)
    return Step("attn", channels, channels, level) if hasattr(block, "proj_out") else None  # NoAttn: nothing


def _attn_steps(blocks: Any, channels: int, level: int) -> list[Step]:
    return [st for b in blocks if (st := _attn_step(b, channels, level)) is not None]


def _encoder_steps(enc: nn.Module, quant: nn.Module | None) -> list[Step]:
    steps, level = [Step("conv", enc.conv_in.in_channels, enc.conv_in.out_channels, 0)], 0
    for down in enc.down:
        for i, block in enumerate(down.block):
            steps.append(Step(_res_kind(block), block.in_channels, block.out_channels, level))
            steps += _attn_steps(down.attn[i : i + 1], block.out_channels, level)
        if hasattr(down, "downsample"):
            steps.append(Step("down", block.out_channels, block.out_channels, level))
            level += 1
    c = enc.mid.block_1.out_channels
    steps += [Step("res", c, c, level), *_attn_steps([enc.mid.attn_1], c, level), Step("res", c, c, level)]
    steps.append(Step("head", c, enc.conv_out.out_channels, level))
    if quant is not None:
        steps.append(Step("conv", quant.in_channels, quant.out_channels, level))
    return [*steps, Step("copy", steps[-1].cout, steps[-1].cout, level)]


def _decoder_steps(dec: nn.Module, post_quant: nn.Module | None, level: int) -> list[Step]:
    steps = [] if post_quant is None else [Step("conv", post_quant.in_channels, post_quant.out_channels, level)]
    c = dec.conv_in.out_channels
    steps.append(Step("conv", dec.conv_in.in_channels, c, level))
    kind = _res_kind(dec.mid.block_1)
    steps += [Step(kind, c, c, level), *_attn_steps([dec.mid.attn_1], c, level), Step(kind, c, c, level)]
    for up in reversed(dec.up):
        for i, block in enumerate(up.block):
            steps.append(Step(_res_kind(block), block.in_channels, block.out_channels, level))
            steps += _attn_steps(up.attn[i : i + 1], block.out_channels, level)
        if hasattr(up, "upsample"):
            steps.append(Step("up", block.out_channels, block.out_channels, level))
            level -= 1
    steps.append(Step("head", dec.conv_out.in_channels, dec.conv_out.out_channels, level))
    return [*steps, Step("copy", dec.conv_out.out_channels, dec.conv_out.out_channels, level)]


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
    enc, dec = model.encoder, model.decoder
    quant, post_quant = getattr(model, "quant_conv", None), getattr(model, "post_quant_conv", None)
    levels = enc.num_resolutions - 1

    def count(*mods: nn.Module | None) -> int:
        return sum(p.numel() for m in mods if m is not None for p in m.parameters())

    return Arch(
        encode=tuple(_encoder_steps(enc, quant)),
        decode=tuple(_decoder_steps(dec, post_quant, levels)),
        weights={"encode": count(enc, quant), "decode": count(dec, post_quant)},
        downscale=2**levels,
        in_channels=enc.conv_in.in_channels,
        latent_channels=dec.conv_in.in_channels if post_quant is None else post_quant.in_channels,
    )


# ---------------------------------------------------------------- per-step costs


def _attention_bytes(name: str, b: int, n: int, c: int, elem: int, device: torch.device) -> int:
    """Working set of one attention call on [b, 1, n, c] q/k/v beyond the output."""
    scores = b * n * n * attn.score_bytes(elem)
    if name == "auto":
        free = attn.available_memory(device)
        name = "sdpa" if scores <= free * attn.AUTO_FRACTION else attn.AUTO_FALLBACK.get(device.type, "chunked")
    if name in ("sdpa", "xformers"):
        return 3 * b * n * c * elem  # contiguous copies of q, k, v; the fused kernels keep O(n) scratch
    if name == "chunked":
        qc = min(n, attn.CHUNK_QUERY)
        return min(scores, attn.CHUNK_BYTES) + 3 * b * qc * c * 4
    if name == "split":
        return min(scores, int(attn.available_memory(device) * attn.SPLIT_FRACTION))
    return scores  # basic, and any registered backend we know nothing about


def _step_cost(st: Step, hw: tuple[int, int], b: int, elem: int, ctx: dict[str, Any]) -> tuple[int, int]:
    """(bytes alive at the step's worst moment beyond its input, bytes of its output) for input size hw."""
    px = hw[0] * hw[1]
    ws = ctx["ws"]

    def act(c: float, area: float = px) -> float:  # one activation [b, c, h, w]
        return b * c * area * elem

    ci, co = act(st.cin), act(st.cout)
    if st.kind == "conv":
        return int(co + ws * ci), int(co)
    if st.kind in ("res", "vres"):
        short = (co + ws * ci) if st.cin != st.cout else 0.0
        peak = max(2 * ci, ci + co + ws * ci, 3 * co + ws * co, 2 * co + short, 3 * co)
        if st.kind == "vres":  # the temporal stack after the spatial block (not calibrated)
            peak = max(peak, 5 * co + ws * co)
        return int(peak), int(co)
    if st.kind in ("attn", "vattn"):
        work = _attention_bytes(ctx["attention"], b, px, st.cin, elem, ctx["device"])
        peak = max(4 * ci + ws * ci, 5 * ci + work, 6 * ci)
        if st.kind == "vattn":  # then a transformer block across frames (one clip of b frames at worst), not calibrated
            frames = _attention_bytes(ctx["attention"], px, b, st.cin, elem, ctx["device"])
            peak = max(peak, 3 * ci + max(5 * ci + frames, FF_WIDTH * ci))
        return int(peak), int(ci)
    if st.kind in ("xattn", "xvattn"):  # x, the tokens, then per block attention or feed-forward (not calibrated)
        tok = act(st.inner)
        d = st.inner // st.heads
        work = _attention_bytes(ctx["attention"], b * st.heads, px, d, elem, ctx["device"])
        frames = _attention_bytes(ctx["attention"], px * st.heads, b, d, elem, ctx["device"]) if st.kind == "xvattn" else 0
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


def _size(height: int, width: int, level: int) -> tuple[int, int]:
    return math.ceil(height / 2**level), math.ceil(width / 2**level)


def _elem(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def _ctx(device: str | torch.device, attention: str | None) -> dict[str, Any]:
    device = torch.device(device)
    return {"device": device, "ws": CONV_WORKSPACE.get(device.type, 1.0), "attention": attention or attn.current_attention()}


def _chain_peak(steps: tuple[Step, ...], sizes: Callable[[Step], tuple[int, int]], b: int, elem: int, ctx: dict[str, Any]) -> int:
    """Peak bytes of running `steps` in order, each step's input freed once the next one has its output."""
    live = peak = 0  # the first input is the caller's tensor, counted separately
    for st in steps:
        extra, out = _step_cost(st, sizes(st), b, elem, ctx)
        peak = max(peak, live + extra)
        live = out
    return peak


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
    ctx = _ctx(device, attention)
    chain = _chain_peak(arch.__dict__[op], lambda st: _size(height, width, st.level), batch, elem, ctx)
    fixed = arch.weights[op] * elem + _input_bytes(arch, op, height, width, batch, elem)
    return int(SAFETY * (chain + fixed))


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

    fast: one tile plus `halo` context on each side (default FAST_HALO * tile) through the whole
    network, plus the caller's input and the full output buffer. exact: the tiles advance together
    block by block; at each block the device holds one tile's working set (EXACT_HALO pixels of
    context) and, on CPU, the full-size stored activations that block reads and writes (its input
    and output); on an accelerator those live in host memory and are not counted. The mid-block
    attention always runs on the whole latent.
    """
    height, width = height or tile, width or tile
    _check(op, height, width, min(batch, tile))
    arch, elem = architecture(model_or_cfg), _elem(dtype)
    ctx = _ctx(device, attention)
    steps = arch.__dict__[op]
    fixed = arch.weights[op] * elem + _input_bytes(arch, op, height, width, batch, elem)
    full_out = _step_cost(steps[-1], _size(height, width, steps[-1].level), batch, elem, ctx)[1]

    def tile_size(st: Step, context: int) -> tuple[int, int]:
        th, tw = _size(min(tile, height), min(tile, width), st.level)
        return th + 2 * context, tw + 2 * context

    if mode == "fast":
        pad = math.ceil((FAST_HALO * tile if halo is None else halo) / arch.downscale) * arch.downscale
        peak = _chain_peak(steps, lambda st: tile_size(st, pad // 2**st.level), batch, elem, ctx) + full_out
    else:
        on_host = ctx["device"].type == "cpu"
        peak = 0
        for st in steps:
            full_hw = _size(height, width, st.level)
            if st.kind in ATTN_KINDS:  # global: on the whole latent, which is held in full
                extra, out = _step_cost(st, full_hw, batch, elem, ctx)
                peak = max(peak, extra + out)
                continue
            extra, _ = _step_cost(st, tile_size(st, EXACT_HALO), batch, elem, ctx)
            stored = 0
            if on_host:
                inp = batch * st.cin * full_hw[0] * full_hw[1] * elem
                out = _step_cost(st, full_hw, batch, elem, ctx)[1]
                stored = inp + out  # vaetool.tiling.exact keeps about two full-size activations
            peak = max(peak, stored + extra)
        peak += full_out
    return int(SAFETY * (peak + fixed))
