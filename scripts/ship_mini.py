"""Ship a `vaetool train` run as the package's default model: fp16 weights + the latent scale in configs/mini.yaml.

Run: python scripts/ship_mini.py [RUN_DIR]   (default: runs/mini)
The latent scale is 1 / std of the posterior means over the validation images (the SD convention:
scaled latents have unit variance), recorded by the trainer in the weights' metadata.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import safetensors
import safetensors.torch
import torch

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "vaetool" / "weights" / "mini.safetensors"
CONFIG = ROOT / "configs" / "mini.yaml"


def main(run: Path) -> None:
    """Convert run/model.safetensors to fp16 under vaetool/weights and set the scale in the config."""
    source = run / "model.safetensors"
    with safetensors.safe_open(str(source), "pt") as f:
        meta = dict(f.metadata() or {})
    weights = {k: v.to(torch.float16) for k, v in safetensors.torch.load_file(str(source)).items()}
    scale = round(1.0 / float(meta["latent_std"]), 5)
    keep = {k: meta[k] for k in ("format", "vaetool_version", "step", "ema", "val_psnr", "latent_std", "norm_groups") if k in meta}
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(weights, str(TARGET), metadata=keep | {"family": "vaetool-mini", "scale": str(scale)})
    text = CONFIG.read_text()
    CONFIG.write_text(re.sub(r"scale: [0-9.eE+-]+", f"scale: {scale}", text, count=1))
    print(f"{TARGET.relative_to(ROOT)}: step {meta.get('step')}, val PSNR {meta.get('val_psnr')} dB, "
          f"{TARGET.stat().st_size / 1e6:.1f} MB; latent scale {scale}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "runs" / "mini")
