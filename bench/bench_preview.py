"""Speed of a TAESD preview decode (`vaetool decode --preview`) against the full decoder of its family (issue 15).

Both models are the shipped configs with random weights (same architecture and widths as the published
checkpoints: taesd and sd1 by default), loaded through vaetool.api.load_vae(parts="decoder"); one random
latent of --sizes px is decoded untiled (--tile off: the models' own cost, no planner), alternating which
runs first, best of --repeats. Prints seconds and the preview/full time ratio at each size.

    python bench/bench_preview.py                      # 512 and 1024 px, taesd vs sd1
    python bench/bench_preview.py --preview taesdxl --full sdxl --sizes 512
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from vaetool.api import Vae, load_vae
from vaetool.tiling import Tiling


def seconds(vae: Vae, z: torch.Tensor) -> float:
    """Wall time of one untiled decode of z."""
    start = time.perf_counter()
    with torch.inference_mode():
        vae.decode(z, tiling=Tiling(mode="off"))
    return time.perf_counter() - start


def main() -> None:
    """Decode with the preview and the full decoder at each size; print the times and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preview", default="taesd")
    parser.add_argument("--full", default="sd1")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: said below
        preview = load_vae(args.preview, random_weights=True, parts="decoder")
        full = load_vae(args.full, random_weights=True, parts="decoder")
    print(f"preview {args.preview} vs full {args.full} decoder, random weights, fp32, cpu, torch threads {torch.get_num_threads()}")
    for size in args.sizes:
        z = torch.randn(1, full.latent_format.channels, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
        seconds(preview, z)  # warm-up
        runs: dict[str, list[float]] = {"preview": [], "full": []}
        for i in range(args.repeats):
            order = [("preview", preview), ("full", full)]
            for name, vae in order if i % 2 == 0 else order[::-1]:
                runs[name].append(seconds(vae, z))
        best = {name: min(times) for name, times in runs.items()}
        print(f"{size:5d} px: preview {best['preview']:7.3f} s, full {best['full']:7.3f} s, "
              f"preview/full {best['preview'] / best['full']:.3f} ({best['full'] / best['preview']:.0f}x faster)")


if __name__ == "__main__":
    main()
