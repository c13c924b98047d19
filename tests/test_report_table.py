"""The roundtrip Rich table from a report document: readable at 80 columns, broken limits in red."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console

from vaetool import report


def _row(name: str, size: int, status: str, vs_golden: dict[str, Any] | None, broken: list[str]) -> dict[str, Any]:
    return {"image": name, "width": size, "height": size, "status": status, "reasons": [], "error": None, "limits_broken": broken,
            "vs_input": {"psnr": 100.0, "ssim": 0.999999, "max_diff": 255}, "vs_golden": vs_golden}


def _report(update: bool = False) -> dict[str, Any]:
    rows = [
        _row("camera.png", 1024, "passed", {"psnr": None, "ssim": 1.0, "max_diff": 0}, []),
        _row("portraits/very/deep/folder/holiday-2024-final.png", 1024, "failed", {"psnr": 31.25, "ssim": 0.99, "max_diff": 221},
             ["psnr", "max_diff"]),
        _row("rocket.jpg", 1024, "missing", None, []),
    ]
    return {"model": {"config": "sdxl", "checkpoint": "weights/sdxl_vae.safetensors"}, "images": rows, "golden": "goldens",
            "update_golden": update, "thresholds": {"min_psnr": 40.0, "min_ssim": 0.98, "max_diff": 8}, "thresholds_against": "golden",
            "overall": {"vs_input": {"images": 3, "psnr": 100.0, "ssim": 0.999999, "max_diff": 255},
                        "vs_golden": {"images": 2, "psnr": 34.1, "ssim": 0.995, "max_diff": 221}},
            "passed": False}


def _render(doc: dict[str, Any], color: bool = False) -> str:
    out = io.StringIO()
    Console(file=out, width=80, force_terminal=color, color_system="standard" if color else None).print(report.roundtrip_table(doc))
    return out.getvalue()


def test_widest_cells_fit_80_columns_and_only_long_names_fold() -> None:
    text = _render(_report())
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in text
    camera = next(line.split() for line in lines if line.startswith("camera.png"))
    assert camera == ["camera.png", "1024x1024", "100.00", "1.0000", "255", "inf", "1.0000", "0", "passed"]
    failed = next(line.split() for line in lines if "31.25" in line)
    assert failed[-7:] == ["100.00", "1.0000", "255", "31.25", "0.9900", "221", "failed"]
    start = lines.index(next(line for line in lines if "31.25" in line))
    folded = "".join(line.split()[0] for line in lines[start:start + 4])
    assert folded == "portraits/very/deep/folder/holiday-2024-final.png"  # folded over lines, not cut
    rocket = next(line.split() for line in lines if line.startswith("rocket.jpg"))
    assert rocket[-4:] == ["-", "-", "-", "missing"]
    assert "limits vs golden: PSNR >= 40, SSIM >= 0.98, max <= 8" in " ".join(text.split())


def test_broken_limits_and_bad_statuses_are_red() -> None:
    red = "\x1b[31m"
    text = _render(_report(), color=True)
    assert f"{red}31.25" in text and f"{red}221" in text and f"{red}failed" in text and f"{red}missing" in text
    assert f"{red}0.9900" not in text  # SSIM passed
    assert f"{red}100.00" not in text and f"{red}255" not in text  # the limits apply to the golden, not the input


def test_update_run_shows_the_goldens_as_they_were() -> None:
    doc = _report(update=True)
    doc["images"][0]["status"] = "unchanged"
    text = _render(doc)
    assert max(len(line) for line in text.splitlines()) <= 80 and "…" not in text
    assert "unchanged" in text and "as stored before this run" in " ".join(text.split())
