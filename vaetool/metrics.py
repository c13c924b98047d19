"""Image-quality metrics on 8-bit images as written: PSNR, SSIM (scikit-image) and max abs diff.

All functions take uint8 arrays [H, W, 3] (channels last, the layout of a decoded PNG; see
vaetool.io.images.to_uint8), so the numbers describe the files a user gets, not the float tensors
before quantisation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# SSIM as in Wang et al. 2004: an 11x11 Gaussian window (sigma 1.5), population covariance.
SSIM_SIGMA = 1.5
SSIM_GAUSSIAN_WIN = 11
SSIM_MIN_SIDE = 3  # below this no window fits and SSIM is undefined


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    if a.dtype != np.uint8 or b.dtype != np.uint8:
        raise ValueError(f"metrics take uint8 images, got {a.dtype} and {b.dtype}")


def squared_error_sum(a: np.ndarray, b: np.ndarray) -> float:
    """Sum of squared differences of two uint8 images (exact in float64)."""
    _check_pair(a, b)
    d = a.astype(np.float64) - b.astype(np.float64)  # [H, W, 3]
    return float(np.square(d).sum())


def psnr_from_mse(mse: float) -> float:
    """PSNR in dB for 8-bit data from a mean squared error; +inf when the images are identical."""
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 images (+inf when identical)."""
    return psnr_from_mse(squared_error_sum(a, b) / a.size)


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> int:
    """Largest absolute difference in 8-bit levels (0-255) over all pixels and channels."""
    _check_pair(a, b)
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max(initial=0))


def ssim(a: np.ndarray, b: np.ndarray) -> float | None:
    """Mean SSIM of two uint8 RGB images (scikit-image, Gaussian window); None when smaller than 3 px."""
    from skimage.metrics import structural_similarity

    _check_pair(a, b)
    side = min(a.shape[0], a.shape[1])
    if side < SSIM_MIN_SIDE:
        return None
    if side >= SSIM_GAUSSIAN_WIN:
        kwargs: dict[str, object] = {"gaussian_weights": True, "sigma": SSIM_SIGMA, "use_sample_covariance": False}
    else:  # small images: the largest odd uniform window that fits
        kwargs = {"win_size": side if side % 2 else side - 1}
    value = structural_similarity(a, b, channel_axis=-1, data_range=255, **kwargs)
    return float(value)


@dataclass(frozen=True)
class ImageMetrics:
    """Metrics of one image pair; `sse` and `values` let several pairs be pooled into one figure."""

    psnr: float
    ssim: float | None
    max_diff: int
    sse: float
    values: int

    def as_dict(self) -> dict[str, float | int | None]:
        """JSON-ready form: PSNR of identical images (inf) is written as null."""
        return {
            "psnr": None if math.isinf(self.psnr) else round(self.psnr, 4),
            "ssim": None if self.ssim is None else round(self.ssim, 6),
            "max_diff": self.max_diff,
        }


def compare(a: np.ndarray, b: np.ndarray) -> ImageMetrics:
    """PSNR, SSIM and max abs diff of two uint8 images [H, W, 3]."""
    sse = squared_error_sum(a, b)
    return ImageMetrics(psnr_from_mse(sse / a.size), ssim(a, b), max_abs_diff(a, b), sse, int(a.size))


def pooled(metrics: Sequence[ImageMetrics]) -> dict[str, float | int | None]:
    """Overall figures: PSNR of the pooled MSE, mean SSIM, largest max diff, image count."""
    if not metrics:
        return {"images": 0, "psnr": None, "ssim": None, "max_diff": None}
    mse = sum(m.sse for m in metrics) / sum(m.values for m in metrics)
    overall_psnr = psnr_from_mse(mse)
    ssims = [m.ssim for m in metrics if m.ssim is not None]
    return {
        "images": len(metrics),
        "psnr": None if math.isinf(overall_psnr) else round(overall_psnr, 4),
        "ssim": round(float(np.mean(ssims)), 6) if ssims else None,
        "max_diff": max(m.max_diff for m in metrics),
    }
