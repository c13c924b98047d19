"""Metrics on 8-bit images, golden thresholds, heatmaps and the JUnit report."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from skimage.metrics import peak_signal_noise_ratio

from vaetool import golden, metrics, report
from vaetool.io.images import to_uint8


def _image(seed: int, h: int = 32, w: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))  # a smooth ramp [H, W, 3]
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def _noisy(img: np.ndarray, sigma: float, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(img + rng.normal(0, sigma, img.shape), 0, 255).astype(np.uint8)


def _reference_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al. 2004 SSIM, written out: Gaussian sigma 1.5 (truncated at 3.5 sigma), K1 .01, K2 .03."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for ch in range(a.shape[-1]):
        x, y = a[..., ch].astype(np.float64), b[..., ch].astype(np.float64)
        f = lambda t: gaussian_filter(t, 1.5, truncate=3.5)  # noqa: E731
        mx, my = f(x), f(y)
        vx, vy, cxy = f(x * x) - mx * mx, f(y * y) - my * my, f(x * y) - mx * my
        s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        vals.append(s[5:-5, 5:-5].mean())  # scikit-image drops the border the window does not cover
    return float(np.mean(vals))


def test_golden_pixels_survive_the_float_form_save_png_takes() -> None:
    a = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=-1)  # every 8-bit level
    assert (to_uint8(golden.uint8_to_unit(a)) == a).all()


def test_psnr_agrees_with_scikit_image_and_is_infinite_for_identical() -> None:
    a, b = _image(0), _noisy(_image(0), 5.0)
    assert metrics.psnr(a, b) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=255), rel=1e-9)
    assert math.isinf(metrics.psnr(a, a))


def test_ssim_matches_the_published_definition() -> None:
    a = _image(2)
    for sigma in (3.0, 12.0):
        b = _noisy(a, sigma)
        assert metrics.ssim(a, b) == pytest.approx(_reference_ssim(a, b), abs=1e-6)
    assert metrics.ssim(a, a) == pytest.approx(1.0)


def test_ssim_falls_with_noise_and_handles_small_images() -> None:
    a = _image(3)
    values = [metrics.ssim(a, _noisy(a, s)) for s in (2.0, 8.0, 32.0)]
    assert values[0] > values[1] > values[2]
    small = _image(4, 5, 9)
    assert metrics.ssim(small, _noisy(small, 30.0)) < 1.0
    assert metrics.ssim(_image(5, 2, 9), _image(6, 2, 9)) is None


def test_max_abs_diff_and_shape_checks() -> None:
    a = _image(7)
    b = a.copy()
    b[3, 4, 1] = 255 - b[3, 4, 1]
    assert metrics.max_abs_diff(a, b) == abs(int(a[3, 4, 1]) - int(b[3, 4, 1]))
    assert metrics.max_abs_diff(a, a) == 0
    with pytest.raises(ValueError, match="shape"):
        metrics.compare(a, a[:-1])
    with pytest.raises(ValueError, match="uint8"):
        metrics.compare(a.astype(np.float32), a.astype(np.float32))


def test_pooled_psnr_is_the_psnr_of_all_pixels_together() -> None:
    pairs = [(_image(i), _noisy(_image(i), 4.0 * (i + 1), seed=i)) for i in range(3)]
    overall = metrics.pooled([metrics.compare(a, b) for a, b in pairs])
    together = metrics.psnr(np.concatenate([a for a, _ in pairs]), np.concatenate([b for _, b in pairs]))
    assert overall["psnr"] == pytest.approx(together, abs=1e-4)
    assert overall["images"] == 3
    assert overall["max_diff"] == max(metrics.max_abs_diff(a, b) for a, b in pairs)
    assert metrics.compare(pairs[0][0], pairs[0][0]).as_dict()["psnr"] is None  # inf is written as null


def test_thresholds_name_each_broken_limit() -> None:
    a = _image(8)
    close, far = metrics.compare(a, _noisy(a, 0.4)), metrics.compare(a, _noisy(a, 30.0))
    assert golden.Thresholds().failures(close) == []
    reasons = golden.Thresholds().failures(far)
    assert [r.split()[0] for r in reasons] == ["PSNR", "SSIM", "max"]
    assert golden.NO_THRESHOLDS.failures(far) == []


def test_heatmap_is_dark_where_equal_and_brightest_at_the_largest_difference() -> None:
    a = _image(9)
    b = a.copy()
    b[10, 20] = 255 - b[10, 20]
    b[1, 1, 0] = b[1, 1, 0] ^ 1  # a 1-level change elsewhere
    heat, largest = golden.heatmap(a, b)
    assert largest == metrics.max_abs_diff(a, b)
    brightness = heat.astype(int).sum(-1)  # [H, W]
    assert np.unravel_index(brightness.argmax(), brightness.shape) == (10, 20)
    assert brightness[0, 0] == brightness.min() and brightness[1, 1] > brightness[0, 0]
    still, none = golden.heatmap(a, a)
    assert (still == still[0, 0]).all() and none == 0


def test_heatmap_scale_is_absolute_so_small_and_large_differences_look_different() -> None:
    zero = np.zeros((8, 8, 3), dtype=np.uint8)
    small = zero + 6  # every pixel 6 levels off
    large = small.copy()
    large[0, 0] = 221  # and one pixel 221 levels off
    heat_small, top_small = golden.heatmap(zero, small)
    heat_large, top_large = golden.heatmap(zero, large)
    assert (top_small, top_large) == (6, 221)
    assert (heat_small[1:] == heat_large[1:]).all()  # 6 levels have one colour, whatever the largest difference is
    assert np.abs(heat_large[0, 0].astype(int) - heat_small[0, 0].astype(int)).sum() > 200  # 221 vs 6 levels: far apart
    brightness = golden.heat_colours(np.arange(256)).astype(int).sum(-1)
    assert (np.diff(brightness) >= 0).all() and brightness[1] > brightness[0]  # one level already shows


def test_heatmap_file_has_the_legend_below_the_pixel_aligned_image() -> None:
    a, b = _image(10, 20, 30), _noisy(_image(10, 20, 30), 10.0)
    canvas, largest = golden.heatmap_with_legend(a, b)
    heat, _ = golden.heatmap(a, b)
    assert canvas.shape == (20 + golden.LEGEND_HEIGHT, golden.LEGEND_WIDTH, 3)
    assert (canvas[:20, :30] == heat).all() and (canvas[:20, 30:] == golden.LEGEND_BACKGROUND).all()
    strip = canvas[20:]
    assert (strip == golden.legend(golden.LEGEND_WIDTH, largest)).all()
    colours = {tuple(c) for c in strip.reshape(-1, 3)}
    assert tuple(golden.heat_colours(np.array(0))) in colours and tuple(golden.heat_colours(np.array(255))) in colours
    wide = golden.heatmap_with_legend(_image(11, 10, 400), _image(12, 10, 400))[0]
    assert wide.shape == (10 + golden.LEGEND_HEIGHT, 400, 3)


def test_junit_counts_failures_and_errors() -> None:
    cases = [
        report.Case("a.png", 0.5, output="psnr 50"),
        report.Case("b.png", 0.25, failures=("PSNR 30.00 dB < 40", "max diff 20 > 8 levels")),
        report.Case("c.png", error="c.png: not an image"),
    ]
    root = ET.fromstring(ET.tostring(report.junit_tree("vaetool roundtrip", cases, {"model": "tiny-f8"}).getroot()))
    suite = root.find("testsuite")
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("3", "1", "1")
    by_name = {tc.get("name"): tc for tc in suite.iter("testcase")}
    assert by_name["a.png"].find("failure") is None and by_name["a.png"].find("system-out").text == "psnr 50"
    assert "PSNR 30.00" in by_name["b.png"].find("failure").get("message")
    assert by_name["c.png"].find("error").get("message") == "c.png: not an image"
    assert suite.find("properties/property").get("value") == "tiny-f8"
