"""Exact tiled execution: all tiles advance together from one GroupNorm to the next.

`run_program` executes a `Program` op by op. Each op's output is computed tile by tile; a tile
reads the halo its window needs from the stored full-size input (kept as row bands, on the host
when `storage` says so), and the output's per-channel statistics are pooled over all tiles as the
tiles are written (Chan's parallel mean/M2 in float64), so the next GroupNorm normalises every
tile with the statistics of the whole tensor. Attention (`GlobalOp`) runs on the whole tensor
through vaetool's attention dispatch. Input bands an op reads for the last time are freed as soon
as no later tile needs them, so at most about two full-size activations are stored at a time.
The result equals the untiled forward up to float rounding (max abs diff ~1e-6 in fp32).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from vaetool.nn.groupstats import Stats, accumulate
from vaetool.nn.util import loaded_weight
from vaetool.tiling.archs import coder_program
from vaetool.tiling.program import IDENTITY, GlobalOp, Program, TensorFn, WindowOp

MIN_TILE = 4  # smallest tile edge, in pixels of the activation being computed
class Banded:
    """A full-size activation [N, C, H, W] stored as row bands, readable by region, freeable by band."""

    def __init__(self, height: int, width: int, edges: list[int]) -> None:
        self.height, self.width, self.edges = height, width, edges  # band i covers rows edges[i]:edges[i+1]
        self.bands: list[torch.Tensor | None] = []
        self.stats: Stats | None = None

    @staticmethod
    def whole(t: torch.Tensor, band: int, storage: torch.device, stats: bool) -> Banded:
        """Store an existing tensor [N, C, H, W] in bands of `band` rows."""
        b = Banded(t.shape[2], t.shape[3], _edges(t.shape[2], band))
        b.bands = [t[:, :, lo:hi].to(storage) for lo, hi in zip(b.edges[:-1], b.edges[1:], strict=False)]
        if stats:
            b.stats = Stats.of(t)
        return b

    def parts(self, r0: int, r1: int, c0: int, c1: int, device: torch.device) -> list[torch.Tensor]:
        """Rows [r0, r1) x columns [c0, c1) (inside the tensor) on `device`, as one piece per band, top to bottom."""
        parts = []
        for i, (lo, hi) in enumerate(zip(self.edges[:-1], self.edges[1:], strict=False)):
            if hi <= r0 or lo >= r1:
                continue
            band = self.bands[i]
            if band is None:
                raise RuntimeError("tiling bug: a freed band was read again")
            parts.append(band[:, :, max(r0, lo) - lo : min(r1, hi) - lo, c0:c1].to(device))
        return parts

    def region(self, r0: int, r1: int, c0: int, c1: int, device: torch.device) -> torch.Tensor:
        """Rows [r0, r1) x columns [c0, c1) (inside the tensor) on `device`."""
        parts = self.parts(r0, r1, c0, c1, device)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    def free_before(self, row: int) -> None:
        """Drop every band that ends at or above `row` (no later read needs it)."""
        for i, hi in enumerate(self.edges[1:]):
            if hi <= row:
                self.bands[i] = None

    def full(self, device: torch.device) -> torch.Tensor:
        """The whole tensor on `device`."""
        return self.region(0, self.height, 0, self.width, device)


def _edges(n: int, step: int) -> list[int]:
    return [*list(range(0, n, max(step, 1))), n]


def _window_input(
    slots: dict[str, Banded], name: str, rows: tuple[int, int], cols: tuple[int, int], upsample: bool,
    affine: tuple[torch.Tensor, torch.Tensor] | None, device: torch.device, pre: TensorFn | None = None,
) -> torch.Tensor:
    """The zero-padded window rows x cols (unclipped; upsampled coordinates when `upsample`) of a slot.

    `pre` (pointwise) runs on the source region before the upsample and the zero padding.
    """
    src = slots[name]
    f = 2 if upsample else 1
    (r0, r1), (c0, c1) = rows, cols
    cr0, cr1 = max(r0, 0), min(r1, f * src.height)
    cc0, cc1 = max(c0, 0), min(c1, f * src.width)
    box = (cr0 // f, (cr1 - 1) // f + 1, cc0 // f, (cc1 - 1) // f + 1)
    pad = (cc0 - c0, c1 - cc1, cr0 - r0, r1 - cr1)  # left, right, top, bottom: zeros after the norm
    parts = src.parts(*box, device)  # [N, C, rows, w] each, stacked: [N, C, h, w]
    if affine is not None and pre is None and not upsample and parts[0].dtype == affine[0].dtype:
        return _norm_silu_padded(parts, affine, pad)
    x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)  # [N, C, h, w]
    if affine is not None:  # GroupNorm with pooled statistics, then SiLU (pointwise: before the upsample)
        x = F.silu(x.float() * affine[0] + affine[1]).to(x.dtype)
    if pre is not None:
        x = pre(x)
    if upsample:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # [N, C, 2h, 2w]
        x = x[:, :, cr0 % 2 : cr0 % 2 + cr1 - cr0, cc0 % 2 : cc0 % 2 + cc1 - cc0]
    return F.pad(x, pad) if any(pad) else x


def _norm_silu_padded(
    parts: list[torch.Tensor], affine: tuple[torch.Tensor, torch.Tensor], pad: tuple[int, int, int, int]
) -> torch.Tensor:
    """silu(x * a + b) of the stacked row pieces `parts`, written straight into a zero-bordered buffer.

    One new tensor where the plain way makes four (the pieces' concatenation, x * a + b, silu, the
    padded copy): each fresh full-size CPU tensor costs page faults about as long as the arithmetic.
    """
    left, right, top, bottom = pad
    n, c, _, w = parts[0].shape
    h = sum(p.shape[2] for p in parts)
    out = parts[0].new_empty(n, c, top + h + bottom, left + w + right)  # [N, C, h', w']
    for border in (out[:, :, :top], out[:, :, top + h :], out[:, :, top : top + h, :left], out[:, :, top : top + h, left + w :]):
        border.zero_()
    row = top
    for part in parts:  # [N, C, rows, w] each
        torch.addcmul(affine[1], part, affine[0], out=out[:, :, row : row + part.shape[2], left : left + w])
        row += part.shape[2]
    return F.silu(out, inplace=True)  # silu(0) = 0 keeps the border


def _window_tile(
    op: WindowOp, slots: dict[str, Banded], affine: tuple[torch.Tensor, torch.Tensor] | None,
    rows: tuple[int, int], cols: tuple[int, int], device: torch.device,
) -> torch.Tensor:
    """Output rows x cols of a WindowOp, [N, Cout, b-a, d-c]."""
    w = op.window
    if op.upsample and w.phases is not None:
        y = _phase_tile(w.phases, slots, op.src, affine, rows, cols, device, op.pre)
    else:
        x = _window_input(slots, op.src, w.in_range(*rows, 0), w.in_range(*cols, 1), op.upsample, affine, device, op.pre)
        y = w.fn(x)  # [N, Cout, b-a, d-c]
    if op.residual is not None:
        res = slots[op.residual].region(*rows, *cols, device)
        y = y.add_(res) if op.alpha is None and op.window is not IDENTITY else res + y  # in place on a fresh window output
        if op.alpha is not None:
            alpha = op.alpha.to(y.device, y.dtype)
            y = alpha * y + (1.0 - alpha) * res
    return op.act(y) if op.act is not None else y


def _phase_tile(
    phases: Callable[[torch.Tensor], torch.Tensor], slots: dict[str, Banded], name: str,
    affine: tuple[torch.Tensor, torch.Tensor] | None, rows: tuple[int, int], cols: tuple[int, int], device: torch.device,
    pre: TensorFn | None = None,
) -> torch.Tensor:
    """Upsample + 3x3 conv output rows x cols, from the source region one source pixel wider (no 4x buffer).

    The phase conv zero-pads its region, so only outputs 1 px inside the region's upsampled extent are
    right, except at the tensor's own border, where the zeros are the true padding.
    """
    src = slots[name]
    (a, b), (c, d) = rows, cols
    r0, r1 = max((a - 1) // 2, 0), min((b + 2) // 2, src.height)
    c0, c1 = max((c - 1) // 2, 0), min((d + 2) // 2, src.width)
    x = _window_input(slots, name, (r0, r1), (c0, c1), False, affine, device, pre)  # [N, C, r1-r0, c1-c0]
    return phases(x)[:, :, a - 2 * r0 : b - 2 * r0, c - 2 * c0 : d - 2 * c0]  # [N, Cout, b-a, d-c]


def _band_rows(op: WindowOp, a: int, b: int) -> dict[str, int]:
    """First row (in each input's own coordinates) that output rows [a, b) read from each input slot."""
    need = {op.src: max(op.window.in_range(a, b, 0)[0], 0) // (2 if op.upsample else 1)}
    if op.side is not None:
        need[op.src] = min(need[op.src], max(op.side.in_range(a, b, 0)[0], 0))
    if op.residual is not None:
        need[op.residual] = min(need.get(op.residual, a), a)
    return need


def run_program(
    program: Program,
    x: torch.Tensor,
    tile: int | None,
    *,
    stats: dict[str, Stats] | None = None,
    record: dict[str, Stats] | None = None,
    storage: torch.device | str | None = None,
) -> torch.Tensor:
    """Run `program` on `x`, tiles of about `tile` pixels at the largest resolution (None: one tile).

    GroupNorm statistics are pooled over all tiles, or taken from `stats` (slot -> Stats) when given;
    `record`, when given, receives the pooled statistics of every normalised slot.
    """
    device = x.device
    store = torch.device(storage) if storage is not None else device
    h_in = x.shape[2]
    top = max(h_in, round(h_in * program.factor))  # height at the largest resolution

    def band(height: int) -> int:
        return height if tile is None else max(MIN_TILE, math.ceil(tile * height / top))

    normalized = program.normalized()
    last = program.last_use()
    slots = {program.input: Banded.whole(x, band(h_in), store, stats is None and program.input in normalized)}
    for i, op in enumerate(program.ops):
        want = {s for s in op.outputs() if stats is None and s in normalized}
        if isinstance(op, GlobalOp):
            y = op.fn(slots[op.src].full(device))
            outs = {op.out: Banded.whole(y, band(y.shape[2]), store, op.out in want)}
        else:
            outs = _run_window(op, slots, stats, band, device, store, want, program.frames,
                               {s for s in op.inputs() if last.get(s) == i})
        for s in op.inputs():
            if last.get(s) == i:
                del slots[s]
        slots.update(outs)
        if record is not None:
            record.update({name: b.stats for name, b in outs.items() if b.stats is not None})
    return slots[program.output].full(device)


def _run_window(
    op: WindowOp, slots: dict[str, Banded], stats: dict[str, Stats] | None, band: object,
    device: torch.device, store: torch.device, want: set[str], frames: int, dying: set[str],
) -> dict[str, Banded]:
    """All tiles of one WindowOp (and its side output), band by band; frees the bands of dying inputs as it goes."""
    src = slots[op.src]
    h_out, w_out = op.out_size(src.height, 0), op.out_size(src.width, 1)
    step = band(h_out)  # type: ignore[operator]
    outs = {name: Banded(h_out, w_out, _edges(h_out, step)) for name in op.outputs()}
    affine = None
    if op.norm is not None:
        st = src.stats if stats is None else stats[op.src]
        if st is None:
            raise RuntimeError(f"tiling bug: no statistics for slot {op.src}")
        affine = st.scale_shift(op.norm, frames)
    col_edges = _edges(w_out, step)
    tile_fns: dict[str, Callable[[tuple[int, int], tuple[int, int]], torch.Tensor]] = {
        op.out: lambda rows, cols: _window_tile(op, slots, affine, rows, cols, device)
    }
    if op.side is not None and op.side_out is not None:  # the side window on the raw source, same tiles
        side = op.side
        tile_fns[op.side_out] = lambda rows, cols: side.fn(
            _window_input(slots, op.src, side.in_range(*rows, 0), side.in_range(*cols, 1), False, None, device)
        )
    row_edges = _edges(h_out, step)
    for a, b in itertools.pairwise(row_edges):
        for name, fn in tile_fns.items():
            out, row_tiles = outs[name], []
            for c, d in itertools.pairwise(col_edges):
                y = fn((a, b), (c, d))
                if name in want:
                    out.stats = accumulate(out.stats, y)
                row_tiles.append(y.to(store))
            out.bands.append(row_tiles[0] if len(row_tiles) == 1 else torch.cat(row_tiles, dim=3))
            del row_tiles
        if dying and b < h_out:
            for name, row in _band_rows(op, b, min(b + step, h_out)).items():
                if name in dying:
                    slots[name].free_before(row)
    return outs


def host_storage(model: torch.nn.Module) -> torch.device | None:
    """Where exact mode keeps its full-size activations: host memory when the model is on an accelerator."""
    device = loaded_weight(model).device
    return None if device.type == "cpu" else torch.device("cpu")


@torch.inference_mode()
def decode_exact(model: torch.nn.Module, z: torch.Tensor, *, tile_size: int, timesteps: int | None = None) -> torch.Tensor:
    """Latent [B*T, z, h, w] -> image [B*T, 3, h*f, w*f], tiles of `tile_size` image pixels, equal to untiled."""
    frames = clip_frames(z.shape[0], timesteps, model)
    return run_program(coder_program(model, "decode", frames), z, tile_size, storage=host_storage(model))


@torch.inference_mode()
def encode_exact(model: torch.nn.Module, x: torch.Tensor, *, tile_size: int) -> torch.Tensor:
    """Image [B, 3, H, W] -> moments [B, 2z, H/f, W/f], tiles of `tile_size` image pixels, equal to untiled."""
    return run_program(coder_program(model, "encode"), x, tile_size, storage=host_storage(model))


def clip_frames(n: int, timesteps: int | None, model: torch.nn.Module) -> int:
    """Frames per clip: `timesteps`, or the whole batch for a video decoder, or 1 for images."""
    from vaetool.nn.temporal import VideoDecoder, _frames

    if not isinstance(model.decoder, VideoDecoder):
        return 1
    return _frames(n, timesteps)
