"""Gather the training and validation images of the shipped `mini` model (licences in MODEL_CARD.md).

1. Sample photos out of installed pip packages (scikit-image, scikit-learn, matplotlib) -> OUT/train, OUT/val.
2. Unless --no-wallpapers: the wallpapers of five Debian packages, fetched with `apt-get download`
   (no install; needs `apt-get update` once) and unpacked with `dpkg -x` under OUT/debs, each resized
   to WALLPAPER_SIDE px on its short side -> OUT/train/wallpapers. Only these packages are used for
   training; other wallpaper packages are kept for independent evaluation.

3. With --eval-set: the photos of two other wallpaper packages (EVAL_PACKAGES, never trained on), resized to
   EVAL_SIDE px on the short side -> OUT/eval, for `python scripts/eval_mini.py OUT/eval`.

Run: python scripts/prepare_mini_data.py [OUT_DIR] [--no-wallpapers] [--eval-set]   (default: data/mini)
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
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


# Debian package -> its version used for the shipped model (apt-get download asks for exactly this one).
WALLPAPER_PACKAGES = {
    "plasma-workspace-wallpapers": "4:5.27.5-2",  # GPL-2+
    "gnome-backgrounds": "43.1-1",  # CC BY-SA 3.0 / 2.0, CC BY 2.0, GPL-2+ (per image, see its copyright file)
    "ukui-wallpapers": "20.04.3-1.1",  # CC BY-SA 3.0
    "lomiri-wallpapers": "20.04.0-2",  # CC BY-SA 3.0 (per image, see its copyright file)
    "sway-backgrounds": "1.7-6",  # MIT (Expat)
}
# Never trained on: photos of other wallpaper packages, for an independent evaluation (--eval-set -> OUT/eval).
EVAL_PACKAGES = {
    "mate-backgrounds": "1.26.0-1",  # GPL-2+ / CC BY-SA (per image, see its copyright file)
    "lomiri-wallpapers-16.04": "20.04.0-2",  # CC BY-SA 3.0 (per image, see its copyright file)
}
EVAL_SIDE = 432  # short side of the evaluation images: as small as the held-out photos, so as detailed per pixel
FLAT_STD = 2.0  # RGB std in levels below which a wallpaper is one flat colour (its design drawn in the alpha channel)
WALLPAPER_SIDE = 768  # short side after resizing: detail per pixel closer to the small validation photos
SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")  # SVGs are skipped


def pick_wallpapers(root: Path) -> list[Path]:
    """The largest landscape raster image of each wallpaper folder (one per design and variant), no screenshots."""
    best: dict[Path, tuple[int, Path]] = {}
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in SUFFIXES or "screenshot" in path.name or path.is_symlink() or not path.is_file():
            continue
        with Image.open(path) as img:
            w, h = img.size
        if w < h:
            continue
        if any(f"/{d}/" in path.as_posix() for d in ("gnome", "mate")) or path.parent.name == "backgrounds":  # a design a file
            key = path.with_name(re.sub(r"_\d+x\d+$", "", path.stem))  # Elephants_3840x2160 is Elephants at another size
        else:  # a design a folder (its variants and sizes)
            key = path.parent
        if w * h > best.get(key, (0, path))[0]:
            best[key] = (w * h, path)
    return sorted(p for _, p in best.values())


def wallpapers(out: Path, packages: dict[str, str] = WALLPAPER_PACKAGES, split: str = "train/wallpapers",
               side: int = WALLPAPER_SIDE) -> None:
    """apt-get download + dpkg -x each package under out/debs; write the picks, resized to `side`, under out/split."""
    debs, dest = out / "debs", out / split
    debs.mkdir(parents=True, exist_ok=True)
    dest.mkdir(parents=True, exist_ok=True)
    for package, version in packages.items():
        if not list(debs.glob(f"{package}_*.deb")):
            subprocess.run(["apt-get", "download", f"{package}={version}"], cwd=debs, check=True)
        deb = next(debs.glob(f"{package}_*.deb"))
        root = debs / package
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
        for path in pick_wallpapers(root / "usr" / "share"):
            with Image.open(path) as img:
                rgb = img.convert("RGB")
            if np.asarray(rgb).std() < FLAT_STD:
                print(f"{split}: {package}: {path.relative_to(root)}: one flat colour without its alpha, skipped")
                continue
            scale = side / min(rgb.size)
            if scale < 1:
                rgb = rgb.resize((round(rgb.width * scale), round(rgb.height * scale)), Image.LANCZOS)
            name = "-".join(path.relative_to(root / "usr" / "share").with_suffix("").parts[-4:])
            rgb.save(dest / f"{package}--{name}.png")
            print(f"{split}: {package}: {path.relative_to(root)}")


def main(out: Path, with_wallpapers: bool = True, eval_set: bool = False) -> None:
    """Write every source image as RGB PNG under out/train and out/val (and the evaluation set under out/eval)."""
    for split, items in SOURCES.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        for package, folder, name in items:
            src = resources.files(package).joinpath(folder, name)
            with resources.as_file(src) as path, Image.open(path) as img:
                rgb = img.convert("RGBA").convert("RGB") if img.mode in ("RGBA", "LA", "P") else img.convert("RGB")
                rgb.save(out / split / f"{Path(name).stem}.png")
            print(f"{split}: {package}/{folder}/{name}")
    if with_wallpapers:
        wallpapers(out)
    if eval_set:
        wallpapers(out, EVAL_PACKAGES, "eval", EVAL_SIDE)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    main(Path(args[0]) if args else Path("data/mini"), "--no-wallpapers" not in sys.argv, "--eval-set" in sys.argv)
