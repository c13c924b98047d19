"""`vaetool roundtrip --html`: one self-contained page, checked as written and as rendered by headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from headless_chromium import CHROMIUM, SKIP_REASON, Browser
from PIL import Image
from typer.testing import CliRunner

from vaetool import golden, report_html
from vaetool.cli import app

needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason=SKIP_REASON)


def _pixels(source: Path | bytes) -> np.ndarray:
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
        return np.asarray(im.convert("RGB"))


def _image(path: Path, w: int, h: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(ramp + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A failed golden run (a.png passes, sub/b.png's golden was changed, c.png has none) and a plain run, each with --html."""
    tmp = tmp_path_factory.mktemp("html")
    images, goldens, out = tmp / "in", tmp / "golden", tmp / "out"
    _image(images / "a.png", 20, 12, 1)
    _image(images / "sub" / "b.png", 16, 16, 2)
    _image(images / "c.png", 24, 24, 3)
    runner = CliRunner(env={"COLUMNS": "160", "NO_COLOR": "1"})
    base = ["roundtrip", str(images), "-r", "-m", "tiny-f8", "-q"]
    assert runner.invoke(app, [*base, "-o", str(out), "--golden", str(goldens), "--update-golden"]).exit_code == 0
    changed = _pixels(goldens / "sub" / "b.png").astype(int)
    changed[:, :8] = np.clip(changed[:, :8] + 40, 0, 255)  # the left half of b's golden 40 levels brighter
    Image.fromarray(changed.astype(np.uint8)).save(goldens / "sub" / "b.png")
    (goldens / "c.png").unlink()
    result = runner.invoke(app, [*base, "-o", str(out), "--golden", str(goldens), "--report", str(tmp / "report.json"),
                                 "--html", str(tmp / "page.html")])
    assert result.exit_code == 1, result.output
    result = runner.invoke(app, [*base, "-o", str(tmp / "plain"), "--html", str(tmp / "plain.html")])
    assert result.exit_code == 0, result.output
    return {"tmp": tmp, "out": out, "goldens": goldens, "report": json.loads((tmp / "report.json").read_text())}


def _rows(page: str) -> dict[str, str]:
    """The <tr> of each image by name."""
    return {m.group(1): m.group(0) for m in re.finditer(r'<tr id="row-\d+"[^>]*data-name="([^"]+)".*?</tr>', page, re.S)}


def _embedded(row: str, column: str) -> np.ndarray:
    uri = re.search(rf'<img alt="{column}"[^>]*src="data:image/png;base64,([^"]+)"', row)
    assert uri is not None, f"no {column} image"
    return _pixels(base64.b64decode(uri.group(1)))


def test_page_embeds_every_image_and_loads_nothing_else(run: dict[str, Any]) -> None:
    page = (run["tmp"] / "page.html").read_text()
    assert report_html.CSP in page  # the browser refuses any other source
    sources = re.findall(r'\b(?:src|href)="([^"]*)"', page)
    assert sources and all(s.startswith(("data:image/png;base64,", "#row-")) for s in sources)
    assert "<link" not in page and "<script src" not in page and "http://" not in page and "https://" not in page
    rows = _rows(page)
    assert list(rows) == [r["image"] for r in run["report"]["images"]] == ["a.png", "c.png", "sub/b.png"]
    out, goldens = run["out"], run["goldens"]
    assert (_embedded(rows["a.png"], "output") == _pixels(out / "a.png")).all()  # what is shown is what was compared
    assert (_embedded(rows["sub/b.png"], "golden") == _pixels(goldens / "sub" / "b.png")).all()
    heat, _ = golden.heatmap(_pixels(out / "sub" / "b.png"), _pixels(goldens / "sub" / "b.png"))
    assert (_embedded(rows["sub/b.png"], "heatmap") == heat).all()
    assert "not found" in rows["c.png"] and "no golden to compare" in rows["c.png"]


def test_broken_limits_are_highlighted_and_listed_at_the_top(run: dict[str, Any]) -> None:
    page = (run["tmp"] / "page.html").read_text()
    b = next(r for r in run["report"]["images"] if r["image"] == "sub/b.png")
    assert b["status"] == "failed" and "max_diff" in b["limits_broken"]
    assert _rows(page)["sub/b.png"].count('class="num broken"') == len(b["limits_broken"])
    assert _rows(page)["a.png"].count("broken") == 0
    top = page[: page.index("<table id=images>")]
    assert "FAILED" in top and "Needs a look (2)" in top and 'href="#row-2">sub/b.png' in top
    assert "limits vs golden: PSNR &gt;= 40, SSIM &gt;= 0.98, max &lt;= 8" in top


@needs_chromium
def test_chromium_renders_the_failed_run(run: dict[str, Any], tmp_path: Path) -> None:
    with Browser() as browser:
        page = browser.open((run["tmp"] / "page.html").as_uri())
        rows = page.evaluate("[...document.querySelectorAll('#images tbody tr')].map(r => [r.dataset.name, r.dataset.status])")
        assert rows == [["a.png", "passed"], ["c.png", "missing"], ["sub/b.png", "failed"]]
        assert page.evaluate("document.querySelector('h1').textContent") == "vaetool roundtrip: FAILED"
        assert page.evaluate("document.querySelectorAll('#row-2 td.broken').length") >= 1
        loaded = page.evaluate("[...document.images].map(i => i.complete && i.naturalWidth > 0)")
        assert len(loaded) == 4 + 2 + 4 + 1 and all(loaded)  # a: input, output, golden, heatmap; c: no golden; b; the scale
        assert page.evaluate("performance.getEntriesByType('resource').length") == 0  # nothing fetched
        order = "[...document.querySelectorAll('#images tbody tr')].map(r => r.dataset.name)"
        page.evaluate("document.querySelector('th[data-sort=psnr_golden]').click()")
        assert page.evaluate(order) == ["sub/b.png", "a.png", "c.png"]  # lowest PSNR first, identical (inf) next, none last
        page.evaluate("document.querySelector('th[data-sort=psnr_golden]').click()")
        assert page.evaluate(order) == ["a.png", "sub/b.png", "c.png"]
        page.evaluate("document.querySelector('th[data-sort=index]').click()")
        assert page.evaluate(order) == ["a.png", "c.png", "sub/b.png"]
        shot = page.screenshot(tmp_path / "page.png", 1280, 800)
        assert page.errors == []
    pixels = _pixels(shot)
    assert pixels.shape[1] == 1280 and pixels.shape[0] >= 800 and pixels.std() > 10  # a drawn page, not a blank one


@needs_chromium
def test_chromium_renders_a_plain_run(run: dict[str, Any], tmp_path: Path) -> None:
    with Browser() as browser:
        page = browser.open((run["tmp"] / "plain.html").as_uri())
        heads = page.evaluate("[...document.querySelectorAll('#images thead th')].map(t => t.textContent)")
        assert "golden" not in heads and "heatmap vs input" in heads
        assert page.evaluate("[...document.querySelectorAll('#images tbody tr')].map(r => r.dataset.status)") == ["ok"] * 3
        assert page.evaluate("document.querySelector('h1').textContent") == "vaetool roundtrip: PASSED"
        assert len(page.evaluate("[...document.images].filter(i => i.naturalWidth > 0)")) == 3 * 3 + 1
        page.screenshot(tmp_path / "plain.png", 1024, 600)
        assert page.errors == []
