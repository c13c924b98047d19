"""Golden-image checks: compare decoded 8-bit images with stored goldens, diff heatmaps, updates.

A golden is the decoded PNG of an earlier, trusted run, stored under the golden folder at the
same relative path as the output. A run passes when every output is close enough to its golden
(`Thresholds`); each failure gets a heatmap of |output - golden| to look at.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vaetool.errors import InputError
from vaetool.metrics import ImageMetrics, compare


@dataclass(frozen=True)
class Thresholds:
    """Pass limits against a golden (or the input image): PSNR and SSIM at least, max abs diff at most.

    The defaults accept the float noise between machines and attention backends (a level or two,
    PSNR well above 40 dB) and catch real regressions (a changed weight, scale or crop).
    """

    min_psnr: float | None = 40.0
    min_ssim: float | None = 0.98
    max_diff: int | None = 8

    def failures(self, m: ImageMetrics) -> list[str]:
        """One reason per limit that `m` breaks (empty when it passes)."""
        reasons = []
        if self.min_psnr is not None and m.psnr < self.min_psnr:
            reasons.append(f"PSNR {m.psnr:.2f} dB < {self.min_psnr:g}")
        if self.min_ssim is not None and m.ssim is not None and m.ssim < self.min_ssim:
            reasons.append(f"SSIM {m.ssim:.4f} < {self.min_ssim:g}")
        if self.max_diff is not None and m.max_diff > self.max_diff:
            reasons.append(f"max diff {m.max_diff} > {self.max_diff} levels")
        return reasons

    def as_dict(self) -> dict[str, float | int | None]:
        """JSON-ready form."""
        return {"min_psnr": self.min_psnr, "min_ssim": self.min_ssim, "max_diff": self.max_diff}


NO_THRESHOLDS = Thresholds(None, None, None)


class Status(str, enum.Enum):
    """Outcome of one image in a golden run."""

    passed = "passed"
    failed = "failed"
    missing = "missing"  # no golden stored for this output
    updated = "updated"  # --update-golden wrote it


@dataclass
class GoldenResult:
    """The golden check of one output image."""

    status: Status
    golden: Path
    metrics: ImageMetrics | None = None
    reasons: list[str] = field(default_factory=list)
    reference: np.ndarray | None = field(default=None, repr=False, compare=False)  # the golden [H, W, 3] uint8

    @property
    def ok(self) -> bool:
        """True unless the output regressed or has no golden."""
        return self.status in (Status.passed, Status.updated)


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
    reasons = thresholds.failures(metrics)
    return GoldenResult(Status.failed if reasons else Status.passed, golden, metrics, reasons, expected)


# inferno-like colour map anchors: 0 (black) ... 1 (pale yellow)
_HEAT_STOPS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_HEAT_RGB = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64)


def heatmap(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, int]:
    """Colour map of the per-pixel max |a - b| over channels, scaled to the largest difference.

    Returns the RGB heatmap [H, W, 3] uint8 and the difference (in 8-bit levels) shown as brightest.
    """
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=-1)  # [H, W]
    scale = max(int(diff.max(initial=0)), 1)
    t = diff.astype(np.float64) / scale  # [H, W] in [0, 1]
    rgb = np.stack([np.interp(t, _HEAT_STOPS, _HEAT_RGB[:, c]) for c in range(3)], axis=-1)  # [H, W, 3]
    return np.rint(rgb).astype(np.uint8), scale


def uint8_to_unit(img: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float [3, H, W] in [-1, 1], exactly invertible by vaetool.io.images.to_uint8."""
    return torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1.0  # [3, H, W]


def write_heatmap(path: Path, output: np.ndarray, reference: np.ndarray, text: dict[str, str]) -> Path:
    """Write the diff heatmap of `output` vs `reference` as an 8-bit PNG (atomically); returns the path."""
    from vaetool.io.images import save_png

    image, scale = heatmap(output, reference)
    notes = text | {"vaetool.heatmap": f"max over channels of |output - reference|, brightest = {scale} levels"}
    save_png(path, uint8_to_unit(image), bits=8, text=notes, overwrite=True)
    return path


def update(output: np.ndarray, golden: Path, text: dict[str, str]) -> GoldenResult:
    """(Re)write the golden at `golden` from an output [H, W, 3] uint8 (atomic replace)."""
    from vaetool.io.images import save_png

    save_png(golden, uint8_to_unit(output), bits=8, text=text, overwrite=True)
    return GoldenResult(Status.updated, golden)


def summary(results: list[GoldenResult]) -> dict[str, int]:
    """Counts per status."""
    return {s.value: sum(r.status is s for r in results) for s in Status}
