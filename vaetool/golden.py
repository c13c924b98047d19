"""Golden-image checks: compare decoded 8-bit images with stored goldens, diff heatmaps, updates.

A golden is the decoded PNG of an earlier, trusted run, stored under the golden folder at the
same relative path as the output. A run passes when every output is close enough to its golden
(`Thresholds`); each failure gets a heatmap of |output - golden| to look at, on one absolute scale
(a 6-level and a 221-level difference look different) with a legend below the image. Updating
rewrites only goldens that no longer pass, so a git diff of the golden folder shows real changes.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vaetool.errors import InputError
from vaetool.metrics import ImageMetrics, compare
from vaetool.thresholds import NO_THRESHOLDS, Thresholds

__all__ = ["NO_THRESHOLDS", "GoldenResult", "Status", "Thresholds", "check", "golden_path", "update"]




class Status(str, enum.Enum):
    """Outcome of one image in a golden run."""

    passed = "passed"
    failed = "failed"
    missing = "missing"  # no golden stored for this output
    updated = "updated"  # --update-golden wrote it
    unchanged = "unchanged"  # --update-golden kept it: it still passes


@dataclass
class GoldenResult:
    """The golden check of one output image."""

    status: Status
    golden: Path
    metrics: ImageMetrics | None = None
    reasons: list[str] = field(default_factory=list)  # why it failed (or, when updated, why it was rewritten)
    reference: np.ndarray | None = field(default=None, repr=False, compare=False)  # the golden [H, W, 3] uint8
    broken: list[str] = field(default_factory=list)  # names of the broken limits (psnr, ssim, max_diff)

    @property
    def ok(self) -> bool:
        """True unless the output regressed or has no golden."""
        return self.status in (Status.passed, Status.updated, Status.unchanged)


def golden_path(golden_dir: Path, rel: Path) -> Path:
    """Where the golden of the output at relative path `rel` lives (always a .png)."""
    return golden_dir / rel.with_suffix(".png")


def read_uint8_png(path: Path) -> np.ndarray:
    """An 8-bit RGB golden [H, W, 3] uint8; InputError naming the file when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            rgb = im.convert("RGB") if im.mode != "RGB" else im
            return np.asarray(rgb, dtype=np.uint8).copy()  # [H, W, 3]
    except FileNotFoundError:
        raise InputError("no golden image; run with --update-golden to create it", path) from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise InputError(f"cannot read golden image ({err})", path) from None


def check(output: np.ndarray, golden: Path, thresholds: Thresholds) -> GoldenResult:
    """Compare an output [H, W, 3] uint8 with the golden at `golden`."""
    if not golden.exists():
        return GoldenResult(Status.missing, golden, reasons=["no golden image (run with --update-golden)"])
    try:
        expected = read_uint8_png(golden)  # [H, W, 3]
    except InputError as err:
        return GoldenResult(Status.failed, golden, reasons=[str(err)])
    if expected.shape != output.shape:
        got, want = output.shape[1::-1], expected.shape[1::-1]
        reason = f"size {got[0]}x{got[1]} differs from the golden's {want[0]}x{want[1]}"
        return GoldenResult(Status.failed, golden, reasons=[reason])
    metrics = compare(output, expected)
    broken = thresholds.broken(metrics)
    return GoldenResult(Status.failed if broken else Status.passed, golden, metrics, list(broken.values()), expected, list(broken))


# inferno-like colour map anchors: 0 (black) ... 1 (pale yellow)
_HEAT_STOPS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_HEAT_RGB = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64)
HEAT_TICKS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 255)  # legend labels, in 8-bit levels
LEGEND_WIDTH = 320  # px; a narrower heatmap is widened to this with the background colour
LEGEND_HEIGHT = 34
LEGEND_BACKGROUND = (160, 160, 160)  # a neutral gray: no colour of the scale
HEATMAP_NOTE = "max over channels of |output - reference| in 8-bit levels, colour = log2(1 + diff) / 8 (0 black, 255 pale yellow)"


def heat_colours(levels: np.ndarray) -> np.ndarray:
    """Colours of differences in 8-bit levels (any shape [...]) -> [..., 3] uint8, on the fixed scale log2(1 + d) / 8.

    The scale is absolute: one level is already visible (dark purple), 8 levels (the default limit)
    is magenta, 64 orange and 255 pale yellow, whatever the largest difference of the image is.
    """
    t = np.log2(1.0 + np.clip(levels, 0, 255).astype(np.float64)) / 8.0  # [...] in [0, 1]
    rgb = np.stack([np.interp(t, _HEAT_STOPS, _HEAT_RGB[:, c]) for c in range(3)], axis=-1)  # [..., 3]
    return np.rint(rgb).astype(np.uint8)


def heatmap(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, int]:
    """Colour map of the per-pixel max |a - b| over channels on the absolute scale of `heat_colours`.

    Returns the RGB heatmap [H, W, 3] uint8 and the largest difference in 8-bit levels.
    """
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=-1)  # [H, W]
    return heat_colours(diff), int(diff.max(initial=0))


def legend(width: int, largest: int | None = None) -> np.ndarray:
    """The colour bar of the scale with tick labels (8-bit levels) [LEGEND_HEIGHT, width, 3]; `largest` is marked."""
    from PIL import Image, ImageDraw, ImageFont

    strip = Image.new("RGB", (width, LEGEND_HEIGHT), LEGEND_BACKGROUND)
    bar_w, x0, y0, bar_h = min(width, LEGEND_WIDTH) - 16, 8, 6, 10
    levels = np.expm1(np.linspace(0.0, 8.0, bar_w) * np.log(2.0))  # [bar_w] levels at each bar pixel
    strip.paste(Image.fromarray(np.repeat(heat_colours(levels)[None], bar_h, axis=0)), (x0, y0))
    draw, font = ImageDraw.Draw(strip), ImageFont.load_default()
    x_of = lambda d: x0 + round(np.log2(1.0 + d) / 8.0 * (bar_w - 1))  # noqa: E731
    for tick in HEAT_TICKS:
        x = x_of(tick)
        draw.line([(x, y0 + bar_h), (x, y0 + bar_h + 2)], fill=(0, 0, 0))
        label = str(tick)
        left = min(max(x - draw.textlength(label, font=font) / 2, 0), width - draw.textlength(label, font=font))
        draw.text((left, y0 + bar_h + 3), label, fill=(0, 0, 0), font=font)
    if largest is not None:  # a white triangle above the bar at this image's largest difference
        x = x_of(largest)
        draw.polygon([(x - 4, 0), (x + 4, 0), (x, y0 - 1)], fill=(255, 255, 255), outline=(0, 0, 0))
    return np.asarray(strip, dtype=np.uint8).copy()


def heatmap_with_legend(output: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, int]:
    """The heatmap [H, W, 3] at the top left (pixel-aligned with the images), the legend below it; and the largest diff."""
    heat, largest = heatmap(output, reference)  # [H, W, 3]
    h, w = heat.shape[:2]
    width = max(w, LEGEND_WIDTH)
    canvas = np.empty((h + LEGEND_HEIGHT, width, 3), dtype=np.uint8)  # [H + legend, max(W, legend), 3]
    canvas[:] = LEGEND_BACKGROUND
    canvas[:h, :w] = heat
    canvas[h:] = legend(width, largest)
    return canvas, largest


def uint8_to_unit(img: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float [3, H, W] in [-1, 1], exactly invertible by vaetool.io.images.to_uint8."""
    return torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1.0  # [3, H, W]


def write_heatmap(path: Path, output: np.ndarray, reference: np.ndarray, text: dict[str, str]) -> Path:
    """Write the diff heatmap of `output` vs `reference`, legend below, as an 8-bit PNG (atomically); returns the path."""
    from vaetool.io.images import save_png

    image, largest = heatmap_with_legend(output, reference)
    h, w = output.shape[:2]
    notes = text | {"vaetool.heatmap": f"{HEATMAP_NOTE}; image {w}x{h} at the top left, legend below; largest difference {largest} levels"}
    save_png(path, uint8_to_unit(image), bits=8, text=notes, overwrite=True)
    return path


def update(output: np.ndarray, golden: Path, text: dict[str, str], thresholds: Thresholds, *, force: bool = False) -> GoldenResult:
    """(Re)write the golden at `golden` from an output [H, W, 3] uint8 (atomic replace) unless it still passes.

    A golden that passes `thresholds` is kept (status unchanged), so only real changes show in a
    git diff; `force` rewrites it anyway. An updated result carries why the old golden failed.
    """
    from vaetool.io.images import save_png

    before = check(output, golden, thresholds)
    if before.status is Status.passed and not force:
        return dataclasses.replace(before, status=Status.unchanged)
    save_png(golden, uint8_to_unit(output), bits=8, text=text, overwrite=True)
    return GoldenResult(Status.updated, golden, before.metrics, before.reasons, output, before.broken)


def summary(results: list[GoldenResult]) -> dict[str, int]:
    """Counts per status."""
    return {s.value: sum(r.status is s for r in results) for s in Status}
