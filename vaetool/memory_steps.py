"""The coders of an autoencoder as chains of steps, for the peak-memory estimates (vaetool.memory_estimate).

A `Step` is one block of a coder (conv, res block, attention, up/downsample, output head); an
`Arch` holds both coders' chains, their weights and the downscale. This module reads the chains
of the LDM coders (SD, SDXL, SD3, Flux, the video decoders); vaetool.memory_archs reads those of
the other families. `attention_bytes` is the working set of one attention call per backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vaetool.nn import attention as attn
from vaetool.nn.blocks import is_plain_conv


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
    banded: bool = False  # may run row-banded (vaetool.nn.banded) when its input is large enough, on the CPU


ATTN_KINDS = frozenset({"attn", "vattn", "xattn", "xvattn", "wattn"})  # global steps: they run on the whole map
# A bf16 decode of the LDM coders on the CPU sometimes peaks about half the decoder's weights higher, at 1 thread or 2
# (bench/calibrate_memory.py --dtype bf16, fresh runs at 256 px: sd1 193 or 253 MiB, 2 of 6 runs high; Flux.2 197 or
# 239; never in fp32, 351-356 MiB in 5 runs, nor in encode). /proc/self/smaps puts the difference in glibc's heap after
# the model is built: freed copies (random init, cast, NHWC) left fragmented, which the decode touches again. Counted as
# this share of the decoder's weights (sd1 needs 0.42 for its high runs), as Arch.half_overhead (memory_estimate counts
# it in half precision on the CPU only). Wan's decoder showed no such runs (221-227 MiB in 4).
HALF_DECODE_RETAINED = 0.45
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
    # per op, elements (x the element size) held by every call whatever the size: measured for the families in
    # vaetool.memory_archs (weight-sized temporaries such as oneDNN's weight copies and the phase upsample's kernels)
    overhead: dict[str, int] = field(default_factory=dict)
    # x the working set of one tile: the tiled executor's copies the module's forward does not make (its zero-padded
    # windows of convs without a norm), measured for the families in vaetool.memory_archs; the LDM coders: 1
    tile_scale: float = 1.0
    # per op, elements held beyond `overhead` by a half-precision call on the CPU (HALF_DECODE_RETAINED above)
    half_overhead: dict[str, int] = field(default_factory=dict)


def _res_kind(block: nn.Module) -> str:
    return "vres" if hasattr(block, "time_stack") else "res"


def _res_step(block: nn.Module, level: int) -> Step:
    """A res block's Step; a plain ResnetBlock whose structure allows it may run banded (video blocks are not counted so)."""
    kind = _res_kind(block)
    bandable = kind == "res" and hasattr(block, "bandable") and block.bandable()
    return Step(kind, block.in_channels, block.out_channels, level, banded=bandable)


def _head_step(norm: nn.Module, conv: nn.Module, level: int) -> Step:
    """The norm-swish-conv head; banded when the norm is a GroupNorm and the conv a plain one."""
    bandable = isinstance(norm, nn.GroupNorm) and is_plain_conv(conv)
    return Step("head", conv.in_channels, conv.out_channels, level, banded=bandable)


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


def encoder_steps(enc: nn.Module, quant: nn.Module | None) -> list[Step]:
    steps, level = [Step("conv", enc.conv_in.in_channels, enc.conv_in.out_channels, 0)], 0
    for down in enc.down:
        for i, block in enumerate(down.block):
            steps.append(_res_step(block, level))
            steps += _attn_steps(down.attn[i : i + 1], block.out_channels, level)
        if hasattr(down, "downsample"):
            steps.append(Step("down", block.out_channels, block.out_channels, level))
            level += 1
    c = enc.mid.block_1.out_channels
    steps += [_res_step(enc.mid.block_1, level), *_attn_steps([enc.mid.attn_1], c, level), _res_step(enc.mid.block_2, level)]
    steps.append(_head_step(enc.norm_out, enc.conv_out, level))
    if quant is not None:
        steps.append(Step("conv", quant.in_channels, quant.out_channels, level))
    return [*steps, Step("copy", steps[-1].cout, steps[-1].cout, level)]


def decoder_steps(dec: nn.Module, post_quant: nn.Module | None, level: int) -> list[Step]:
    steps = [] if post_quant is None else [Step("conv", post_quant.in_channels, post_quant.out_channels, level)]
    c = dec.conv_in.out_channels
    steps.append(Step("conv", dec.conv_in.in_channels, c, level))
    steps += [_res_step(dec.mid.block_1, level), *_attn_steps([dec.mid.attn_1], c, level), _res_step(dec.mid.block_2, level)]
    for up in reversed(dec.up):
        for i, block in enumerate(up.block):
            steps.append(_res_step(block, level))
            steps += _attn_steps(up.attn[i : i + 1], block.out_channels, level)
        if hasattr(up, "upsample"):
            phases = up.upsample.with_conv and is_plain_conv(up.upsample.conv, (3,))
            steps.append(Step("up", block.out_channels, block.out_channels, level, banded=phases))
            level -= 1
    steps.append(_head_step(dec.norm_out, dec.conv_out, level))
    return [*steps, Step("copy", dec.conv_out.out_channels, dec.conv_out.out_channels, level)]


# ---------------------------------------------------------------- attention


def resolve_attention(name: str, b: int, n: int, elem: int, device: torch.device) -> str:
    """The backend an attention call on [b, 1, n, .] q/k/v runs with (`auto` picks per call)."""
    if name != "auto":
        return name
    scores = b * n * n * attn.score_bytes(elem)
    return "sdpa" if scores <= attn.available_memory(device) * attn.AUTO_FRACTION else attn.AUTO_FALLBACK.get(device.type, "chunked")


def attention_bytes(name: str, b: int, n: int, c: int, elem: int, device: torch.device) -> int:
    """Working set of one attention call on [b, 1, n, c] q/k/v beyond the output (sdpa: contiguous copies of q, k, v)."""
    scores = b * n * n * attn.score_bytes(elem)
    name = resolve_attention(name, b, n, elem, device)
    if name in ("sdpa", "xformers"):
        return 3 * b * n * c * elem  # contiguous copies of q, k, v; the fused kernels keep O(n) scratch
    if name == "chunked":
        qc = min(n, attn.CHUNK_QUERY)
        return min(scores, attn.CHUNK_BYTES) + 3 * b * qc * c * 4
    if name == "split":
        return min(scores, int(attn.available_memory(device) * attn.SPLIT_FRACTION))
    return scores  # basic, and any registered backend we know nothing about
