"""Pass limits of a round trip (against its golden or its input image); torch- and numpy-free, so the CLI
can show their defaults in --help without importing the metrics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vaetool.metrics import ImageMetrics


@dataclass(frozen=True)
class Thresholds:
    """Pass limits against a golden (or the input image): PSNR and SSIM at least, max abs diff at most.

    The defaults accept the float noise between machines and attention backends (a level or two,
    PSNR well above 40 dB) and catch real regressions (a changed weight, scale or crop).
    """

    min_psnr: float | None = 40.0
    min_ssim: float | None = 0.98
    max_diff: int | None = 8

    def broken(self, m: ImageMetrics) -> dict[str, str]:
        """The limits that `m` breaks: metric name (psnr, ssim, max_diff, as in the report) -> reason."""
        broken = {}
        if self.min_psnr is not None and m.psnr < self.min_psnr:
            broken["psnr"] = f"PSNR {m.psnr:.2f} dB < {self.min_psnr:g}"
        if self.min_ssim is not None and m.ssim is not None and m.ssim < self.min_ssim:
            broken["ssim"] = f"SSIM {m.ssim:.4f} < {self.min_ssim:g}"
        if self.max_diff is not None and m.max_diff > self.max_diff:
            broken["max_diff"] = f"max diff {m.max_diff} > {self.max_diff} levels"
        return broken

    def failures(self, m: ImageMetrics) -> list[str]:
        """One reason per limit that `m` breaks (empty when it passes)."""
        return list(self.broken(m).values())

    def as_dict(self) -> dict[str, float | int | None]:
        """JSON-ready form."""
        return {"min_psnr": self.min_psnr, "min_ssim": self.min_ssim, "max_diff": self.max_diff}


NO_THRESHOLDS = Thresholds(None, None, None)
