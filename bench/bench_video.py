"""Temporal consistency of chunked video decoding: the jump at chunk boundaries, with and without overlap blending.

A smooth synthetic latent video (sinusoids drifting slowly across the frame) is decoded by a
temporal VideoDecoder whole (one clip: the reference), in upstream's disjoint chunks
(overlap 0), and in chunks that share and cross-fade `overlap` frames. For each decode the
mean abs difference between consecutive frames is split into pairs at chunk boundaries (the
set of chunks a frame comes from changes between the two frames) and pairs inside chunks; a
boundary/inside ratio near 1 means no visible jump (the whole-clip row uses the pairs where disjoint
chunks would cut). Also printed: the mean abs difference to
the whole-clip decode, and the decoder work (frames decoded / frames).

The default model is the tiny random-weight `tiny-svd` with its zero-initialised temporal
layers woken by seeded noise (as in the parity tests) so that frames really see each other.

    python bench/bench_video.py
    python bench/bench_video.py --frames 48 --chunk 8 --overlaps 0 1 2 4 --latent 8 12
    python bench/bench_video.py --config svd --checkpoint svd_vae.safetensors --latent 16 16 --chunk 14
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch

from vaetool.api import Vae, load_vae
from vaetool.video.chunks import Span, chunk_spans, decode_chunks


def wake_temporal_layers(vae: Vae, seed: int = 0, std: float = 0.1) -> None:
    """Add seeded noise to the temporal parameters (random-weight models start them at zero / 0.5 mixing)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vae.model.decoder.named_parameters():
            if name.endswith("mix_factor"):
                p.copy_(torch.randn(p.shape, generator=gen) * 1.5)
            elif "time_stack" in name or "time_mix" in name:
                p.add_(torch.randn(p.shape, generator=gen) * std)


def smooth_latents(frames: int, channels: int, h: int, w: int, speed: float = 0.15) -> torch.Tensor:
    """A slowly moving pattern [T, C, h, w]: sinusoids drifting by `speed` radians per frame."""
    t = torch.arange(frames, dtype=torch.float32)[:, None, None, None]  # [T, 1, 1, 1]
    c = torch.arange(channels, dtype=torch.float32)[None, :, None, None]  # [1, C, 1, 1]
    y = torch.arange(h, dtype=torch.float32)[None, None, :, None] / h  # [1, 1, h, 1]
    x = torch.arange(w, dtype=torch.float32)[None, None, None, :] / w  # [1, 1, 1, w]
    phase = 2 * math.pi * (x + 0.5 * y) + c * math.pi / 2 - speed * t
    return 2.0 * torch.sin(phase) * torch.cos(2 * math.pi * y + 0.3 * c + 0.5 * speed * t)  # [T, C, h, w]


def boundary_pairs(spans: list[Span], frames: int) -> list[bool]:
    """For each consecutive pair (t, t+1): whether the set of chunks covering the frames changes."""
    cover = [frozenset(k for k, s in enumerate(spans) if s.start <= t < s.stop) for t in range(frames)]
    return [cover[t] != cover[t + 1] for t in range(frames - 1)]


def consistency(video: torch.Tensor, boundary: list[bool]) -> dict[str, float]:
    """Mean abs consecutive-frame difference at boundary pairs and inside chunks, and their ratio."""
    diffs = (video[1:] - video[:-1]).abs().flatten(1).mean(1)  # [T-1]
    mask = torch.tensor(boundary)
    inside = diffs[~mask].mean().item()
    at = diffs[mask].mean().item() if mask.any() else float("nan")
    return {"boundary": at, "inside": inside, "ratio": at / inside, "max_step": diffs.max().item()}


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Decode the synthetic clip whole and chunked with each overlap; one row of numbers per decode."""
    torch.manual_seed(0)
    vae = load_vae(args.config, args.checkpoint)
    if args.checkpoint is None:
        wake_temporal_layers(vae, std=args.wake_std)
    z = smooth_latents(args.frames, vae.latent_format.channels, *args.latent)  # [T, C, h, w]

    def decode(chunk: torch.Tensor, n: int) -> torch.Tensor:
        return vae.decode(chunk, timesteps=n).float()  # [n, 3, H, W]

    whole = decode(z, args.frames)
    cuts = boundary_pairs(chunk_spans(args.frames, args.chunk), args.frames)  # where disjoint chunks would cut
    rows = [{"decode": "whole clip (one call)", **consistency(whole, cuts), "vs_whole": 0.0, "work": 1.0}]
    for overlap in args.overlaps:
        spans = chunk_spans(args.frames, args.chunk, overlap)
        video = decode_chunks(decode, z, args.chunk, overlap)
        row = consistency(video, boundary_pairs(spans, args.frames))
        row |= {"vs_whole": (video - whole).abs().mean().item(), "work": sum(map(len, spans)) / args.frames}
        rows.append({"decode": f"chunks of {args.chunk}, overlap {overlap}", **row})
    return rows


def main() -> None:
    """Parse arguments, run, print a table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="tiny-svd")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--chunk", type=int, default=8)
    parser.add_argument("--overlaps", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--latent", type=int, nargs=2, default=[8, 12], metavar=("H", "W"))
    parser.add_argument("--wake-std", type=float, default=0.1, help="noise on random temporal weights")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = run(args)
    print(f"{args.config}: {args.frames} frames, latent {args.latent[0]}x{args.latent[1]}, chunk {args.chunk}")
    print(f"{'decode':<28} {'boundary':>9} {'inside':>9} {'ratio':>7} {'max step':>9} {'vs whole':>9} {'work':>6}")
    for r in rows:
        print(f"{r['decode']:<28} {r['boundary']:>9.5f} {r['inside']:>9.5f} {r['ratio']:>7.3f} "
              f"{r['max_step']:>9.5f} {r['vs_whole']:>9.5f} {r['work']:>6.2f}")


if __name__ == "__main__":
    main()
