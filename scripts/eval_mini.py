"""Compare a model's round trip with a box-downscale-by-8 + bicubic-upscale resize, photo by photo.

    python scripts/eval_mini.py data/mini/val                       # the shipped mini
    python scripts/eval_mini.py data/mini/val --checkpoint runs/mini/model.safetensors --json out.json

The round trip is what `vaetool roundtrip` does: pad (replicate) to a multiple of 8, encode to the
posterior mode, decode, crop, round to 8 bits. The resize keeps ceil(W/8) x ceil(H/8) RGB pixels
(Pillow BOX filter) and scales them back with Pillow's bicubic filter: 3 numbers per 8x8 block
against the latent's 4. PSNR/SSIM are vaetool.metrics' (pooled PSNR = PSNR of the pooled MSE).
Also printed: the gray tint (mean |R-G|, |G-B| in levels) of each photo's grayscale version.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vaetool.api import Vae, load_vae
from vaetool.io.images import IMAGE_SUFFIXES, crop_to, pad_to_multiple, to_uint8
from vaetool.metrics import ImageMetrics, compare, pooled


def roundtrip(vae: Vae, rgb: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> the model's round trip as uint8 [H, W, 3] (posterior mode)."""
    x = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 127.5 - 1  # [3, H, W]
    padded, size = pad_to_multiple(x, vae.downscale, "replicate")  # [3, H', W']
    out = vae.decode(vae.encode(padded[None]))[0]  # [3, H', W']
    return to_uint8(crop_to(out, size))


def resize_baseline(rgb: np.ndarray, factor: int = 8) -> np.ndarray:
    """Box downscale by `factor` (sides rounded up) and bicubic upscale back, uint8 [H, W, 3]."""
    img = Image.fromarray(rgb)
    w, h = img.size
    small = img.resize((math.ceil(w / factor), math.ceil(h / factor)), Image.BOX)
    return np.asarray(small.resize((w, h), Image.BICUBIC))


def gray_tint(rgb: np.ndarray) -> tuple[float, float]:
    """Mean |R-G| and |G-B| in 8-bit levels."""
    a = rgb.astype(np.float64)
    return float(np.abs(a[..., 0] - a[..., 1]).mean()), float(np.abs(a[..., 1] - a[..., 2]).mean())


def evaluate(vae: Vae, folder: Path) -> dict[str, object]:
    """Per-photo and pooled PSNR/SSIM of the model and of the resize, and the gray tints."""
    rows, model_m, resize_m = [], list[ImageMetrics](), list[ImageMetrics]()
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB"))  # [H, W, 3]
        m, r = compare(roundtrip(vae, rgb), rgb), compare(resize_baseline(rgb), rgb)
        gray = np.repeat(np.asarray(Image.fromarray(rgb).convert("L"))[..., None], 3, axis=2)  # [H, W, 3]
        model_m.append(m)
        resize_m.append(r)
        rows.append({"image": path.name, "size": f"{rgb.shape[1]}x{rgb.shape[0]}", "psnr": round(m.psnr, 3), "ssim": round(m.ssim or 0, 4),
                     "resize_psnr": round(r.psnr, 3), "resize_ssim": round(r.ssim or 0, 4), "gain_db": round(m.psnr - r.psnr, 3),
                     "gray_tint": [round(t, 3) for t in gray_tint(roundtrip(vae, gray))]})
    return {"images": rows, "pooled": pooled(model_m), "resize_pooled": pooled(resize_m)}


def main() -> None:
    """Print the comparison table (and write JSON with --json)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--checkpoint", type=Path, help="weights to test (default: the shipped mini)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    vae = load_vae("mini", args.checkpoint)
    result = evaluate(vae, args.folder)
    print(f"{'image':28s} {'size':>9s} {'PSNR':>7s} {'resize':>7s} {'gain':>6s} {'SSIM':>6s} {'resize':>6s}  gray tint")
    for r in result["images"]:
        print(f"{r['image']:28s} {r['size']:>9s} {r['psnr']:7.2f} {r['resize_psnr']:7.2f} {r['gain_db']:+6.2f} "
              f"{r['ssim']:6.3f} {r['resize_ssim']:6.3f}  {r['gray_tint']}")
    p, q = result["pooled"], result["resize_pooled"]
    print(f"{'pooled':38s} {p['psnr']:7.2f} {q['psnr']:7.2f} {p['psnr'] - q['psnr']:+6.2f} {p['ssim']:6.3f} {q['ssim']:6.3f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
