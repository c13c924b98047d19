"""Copy the training and validation photos of the shipped `mini` model out of installed pip packages.

Every image comes from a package's own sample data (licences in MODEL_CARD.md); nothing is
downloaded. Run: python scripts/prepare_mini_data.py [OUT_DIR]   (default: data/mini)
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

from PIL import Image

# (package, folder inside it, file) -> split. Validation photos are held out from training.
SOURCES: dict[str, list[tuple[str, str, str]]] = {
    "train": [
        ("skimage", "data", "astronaut.png"),
        ("skimage", "data", "rocket.jpg"),
        ("skimage", "data", "hubble_deep_field.jpg"),
        ("skimage", "data", "retina.jpg"),
        ("skimage", "data", "ihc.png"),
        ("skimage", "data", "motorcycle_left.png"),
        ("skimage", "data", "motorcycle_right.png"),
        ("skimage", "data", "color.png"),
        ("skimage", "data", "camera.png"),  # four grayscale photos / textures (used as RGB)
        ("skimage", "data", "brick.png"),
        ("skimage", "data", "grass.png"),
        ("skimage", "data", "gravel.png"),
        ("sklearn", "datasets/images", "china.jpg"),
        ("matplotlib", "mpl-data/sample_data", "grace_hopper.jpg"),
    ],
    "val": [
        ("skimage", "data", "chelsea.png"),
        ("skimage", "data", "coffee.png"),
        ("sklearn", "datasets/images", "flower.jpg"),
    ],
}


def main(out: Path) -> None:
    """Write every source image as RGB PNG under out/train and out/val."""
    for split, items in SOURCES.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        for package, folder, name in items:
            src = resources.files(package).joinpath(folder, name)
            with resources.as_file(src) as path, Image.open(path) as img:
                rgb = img.convert("RGBA").convert("RGB") if img.mode in ("RGBA", "LA", "P") else img.convert("RGB")
                rgb.save(out / split / f"{Path(name).stem}.png")
            print(f"{split}: {package}/{folder}/{name}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("data/mini"))
