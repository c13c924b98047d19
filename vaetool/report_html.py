"""The roundtrip report as one self-contained HTML page: what a person reviewing a (failed) golden run looks at.

`render_html(report)` takes the report document of `vaetool roundtrip` (the --report JSON) and
reads the images from the paths it names: every image is embedded as a data: URI (PNG), so the
page is one file that opens anywhere, with no external asset and no network (its
Content-Security-Policy forbids both). At the top: the verdict, counts, model, limits, overall
figures, the images that need a look and the heatmap scale; then one row per image with its
metrics (broken limits highlighted), input, output, golden and heatmap. A few lines of inline JS
sort the rows by a column (PSNR, name, status, input order) and toggle an image to full size.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vaetool import golden
from vaetool.report import METRICS, OK_STATUSES, limits_text, metric_text

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
IMAGE_COLUMNS = ("input", "output", "golden", "heatmap")
LABELS = {"psnr": "PSNR", "ssim": "SSIM", "max_diff": "max"}
MIN_SHOWN = 96  # px: smaller images are shown enlarged by a whole factor, pixels kept sharp

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.5em; margin: 0 0 .3em; } h1 .verdict { padding: 0 .3em; border-radius: 4px; color: #fff; }
.pass { background: #2e7d32; } .fail { background: #c62828; }
dl { display: grid; grid-template-columns: max-content auto; gap: .15em 1em; margin: .5em 0 1em; } dt { color: #666; } dd { margin: 0; }
table { border-collapse: collapse; } th, td { border: 1px solid #ddd; padding: .25em .5em; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
th[data-sort] { cursor: pointer; text-decoration: underline dotted; } th[aria-sort=ascending]::after { content: " \\25B2"; }
th[aria-sort=descending]::after { content: " \\25BC"; }
tr.bad > td:first-child { box-shadow: inset 4px 0 #c62828; } td.broken { background: #ffcdd2; color: #b71c1c; font-weight: bold; }
.status { font-weight: bold; } .status.bad { color: #c62828; } .status.good { color: #2e7d32; }
ul.reasons { margin: .2em 0 0; padding-left: 1em; color: #b71c1c; font-size: .85em; min-width: 11em; }
td.name { min-width: 9em; } .path { color: #666; font-size: .85em; word-break: break-all; }
img { max-width: 180px; max-height: 240px; cursor: zoom-in; display: block; } img.legend { max-width: none; cursor: default; }
img.zoom { max-width: none; max-height: none; cursor: zoom-out; } img.zoom, img.small { image-rendering: pixelated; }
.size { white-space: nowrap; } .none { color: #999; font-style: italic; }
"""

SCRIPT = """
document.querySelectorAll('th[data-sort]').forEach(th => th.addEventListener('click', () => {
  const key = th.dataset.sort, body = document.querySelector('#images tbody');
  const dir = th.getAttribute('aria-sort') === 'ascending' ? -1 : 1;
  document.querySelectorAll('th[data-sort]').forEach(h => h.removeAttribute('aria-sort'));
  th.setAttribute('aria-sort', dir > 0 ? 'ascending' : 'descending');
  const val = r => (r.dataset[key] === '' ? null : th.dataset.type === 'text' ? r.dataset[key] : Number(r.dataset[key]));
  const rows = [...body.rows].sort((a, b) => {
    const x = val(a), y = val(b);
    if (x === null || y === null) return (x === null) - (y === null);  // rows without the value last
    return (x < y ? -1 : x > y ? 1 : 0) * dir;
  });
  rows.forEach(r => body.appendChild(r));
}));
document.querySelectorAll('#images img').forEach(img => img.addEventListener('click', () => img.classList.toggle('zoom')));
"""


def png_data_uri(pixels: np.ndarray) -> str:
    """An 8-bit RGB image [H, W, 3] as a data:image/png;base64 URI."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _png_pixels(path: Path) -> np.ndarray:
    """An image file as it was compared: 8-bit RGB [H, W, 3]; ValueError with a short reason when unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()  # [H, W, 3]
    except FileNotFoundError:
        raise ValueError("not found") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ValueError(f"cannot read ({err})") from None


def _input_pixels(path: Path) -> np.ndarray:
    """The input the model saw (vaetool's loader: EXIF orientation, alpha, 16-bit) as 8-bit RGB [H, W, 3]."""
    from vaetool.errors import VaeToolError
    from vaetool.io.images import load_image, to_uint8

    if not path.exists():
        raise ValueError("not found")
    try:
        return to_uint8(load_image(path))  # [H, W, 3]
    except (VaeToolError, OSError, ValueError) as err:
        raise ValueError(f"cannot read ({err})") from None


class _Row:
    """The images of one report row, read once: pixels or the reason they are not shown."""

    def __init__(self, row: Mapping[str, Any], against: str, base: Path | None) -> None:
        def path(key: str) -> Path | None:
            value = row.get(key)
            if value is None:
                return None
            p = Path(value)
            return p if base is None or p.is_absolute() else base / p

        self.pixels: dict[str, np.ndarray] = {}
        self.missing: dict[str, str] = {}
        readers = {"input": ("source", _input_pixels), "output": ("output", _png_pixels), "golden": ("golden", _png_pixels)}
        for column, (key, read) in readers.items():
            where = path(key)
            if where is None:
                self.missing[column] = "none"
                continue
            try:
                self.pixels[column] = read(where)
            except ValueError as err:
                self.missing[column] = f"{err}: {where}"
        reference, output = self.pixels.get(against), self.pixels.get("output")
        if output is None or reference is None:
            self.missing["heatmap"] = f"no {'output' if output is None else against} to compare"
        elif output.shape != reference.shape:
            self.missing["heatmap"] = f"output and {against} differ in size"
        else:  # drawn here for every image (on disk only failures get one), the size of the others; the scale is at the top
            self.pixels["heatmap"], _ = golden.heatmap(output, reference)

    def cell(self, column: str) -> str:
        """The <td> of one image column."""
        if column in self.pixels:
            h, w = self.pixels[column].shape[:2]
            small = f' class="small" style="width: {-(-MIN_SHOWN // w) * w}px"' if w < MIN_SHOWN else ""
            uri = png_data_uri(self.pixels[column])
            return f'<td><img alt="{column}" title="{column}, {w}x{h}: click to zoom"{small} src="{uri}"></td>'
        return f'<td class="none">{html.escape(self.missing.get(column, "none"))}</td>'


def _metric_cells(metrics: Mapping[str, Any] | None, broken: Sequence[str]) -> str:
    return "".join(f'<td class="num{" broken" if k in broken else ""}">{metric_text(k, metrics)}</td>' for k in METRICS)


def _sort_value(metrics: Mapping[str, Any] | None) -> str:
    """The PSNR of a row for sorting: Infinity for identical images, '' when there is none."""
    if metrics is None:
        return ""
    if metrics["psnr"] is None:
        return "Infinity" if metrics.get("max_diff") == 0 else ""
    return str(metrics["psnr"])


def _notes(row: Mapping[str, Any]) -> list[str]:
    """Why a row is not fine: the broken limits, or its error."""
    return list(row["reasons"]) or ([row["error"]] if row["error"] else [])


def _summary(report: Mapping[str, Any], groups: Sequence[str]) -> str:
    images, model = report["images"], report["model"]
    passed = report["passed"]
    counts = ", ".join(f"{n} {status}" for status, n in report["counts"].items()) or "no images"
    mode = "plain" if report["golden"] is None else "update goldens" if report["update_golden"] else "compare with goldens"
    weights = "none (random weights)"
    if model.get("checkpoint"):
        weights = model["checkpoint"] + (f" (sha256 {model['sha256'][:16]}...)" if len(model.get("sha256") or "") == 64 else "")
    facts = {
        "model": f"{model.get('config') or '-'} (family {model.get('family') or '-'})",
        "weights": weights,
        "run": f"{mode}; {report['dtype']} on {report['device']}; {report['seconds']} s; vaetool {report['vaetool_version']}",
        "goldens": report["golden"],
        "limits": limits_text(report) or "none",
    }
    for group in groups:
        overall = report["overall"][f"vs_{group}"]
        if overall is not None:
            figures = ", ".join(f"{LABELS[k]} {metric_text(k, overall)}" for k in METRICS)
            facts[f"overall vs {group}"] = f"{figures} ({overall['images']} images)"
    dl = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in facts.items() if v is not None)
    bad = [(i, r) for i, r in enumerate(images) if r["status"] not in OK_STATUSES]
    look = ""
    if bad:
        items = "".join(f'<li><a href="#row-{i}">{html.escape(r["image"])}</a>: {html.escape(r["status"])}'
                        f"{''.join('; ' + html.escape(note) for note in _notes(r))}</li>" for i, r in bad)
        look = f"<h2>Needs a look ({len(bad)})</h2><ul>{items}</ul>"
    legend = png_data_uri(golden.legend(golden.LEGEND_WIDTH))
    scale = (f"<p>Heatmap scale (8-bit levels; {html.escape(golden.HEATMAP_NOTE)}; a heatmap file under heatmaps/ "
             "has it below the image, with a triangle at its largest difference):<br>"
             f'<img class="legend" alt="heatmap scale" src="{legend}"></p>')
    verdict = f'<span class="verdict {"pass" if passed else "fail"}">{"PASSED" if passed else "FAILED"}</span>'
    return f"<h1>vaetool roundtrip: {verdict}</h1><p id=counts>{len(images)} images: {html.escape(counts)}</p><dl>{dl}</dl>{look}{scale}"


def render_html(report: Mapping[str, Any], base: Path | None = None) -> str:
    """The page of a roundtrip report; relative image paths in it are read from `base` (default: the working directory)."""
    groups = ["input", "golden"] if report["golden"] is not None else ["input"]
    against = report["thresholds_against"]
    columns = [c for c in IMAGE_COLUMNS if c != "golden" or report["golden"] is not None]
    group_heads = "".join(f'<th colspan="3">vs {g}</th>' for g in groups)
    metric_heads = "".join(
        f'<th data-sort="psnr_{g}">PSNR</th><th>SSIM</th><th>max</th>' for g in groups)
    image_heads = "".join(f'<th rowspan="2">{c}{" vs " + against if c == "heatmap" else ""}</th>' for c in columns)
    head = (f'<tr><th rowspan="2" data-sort="index">#</th><th rowspan="2" data-sort="name" data-type="text">image</th>'
            f'<th rowspan="2" data-sort="status" data-type="text">status</th>{group_heads}{image_heads}</tr><tr>{metric_heads}</tr>')
    rows = []
    for i, r in enumerate(report["images"]):
        images = _Row(r, against, base)
        good = r["status"] in OK_STATUSES
        notes = _notes(r)
        reasons = f'<ul class="reasons">{"".join(f"<li>{html.escape(x)}</li>" for x in notes)}</ul>' if notes else ""
        size = "" if r["width"] is None else f"{r['width']}x{r['height']}"
        sort = "".join(f' data-psnr_{g}="{_sort_value(r[f"vs_{g}"])}"' for g in groups)
        metrics = "".join(_metric_cells(r[f"vs_{g}"], r.get("limits_broken", []) if g == against else []) for g in groups)
        name = html.escape(r["image"])
        status = html.escape(r["status"])
        rows.append(
            f'<tr id="row-{i}" class="{"good" if good else "bad"}" data-index="{i}" data-name="{name}" data-status="{status}"{sort}>'
            f'<td class="num">{i + 1}</td><td class="name"><b>{name}</b> <span class="path size">{size}</span>'
            f'<div class="path">{html.escape(r["source"])}</div></td>'
            f'<td><span class="status {"good" if good else "bad"}">{status}</span>{reasons}</td>'
            f"{metrics}{''.join(images.cell(c) for c in columns)}</tr>")
    title = f"vaetool roundtrip: {'passed' if report['passed'] else 'FAILED'} ({len(report['images'])} images)"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f'<meta name="viewport" content="width=device-width"><title>{html.escape(title)}</title><style>{STYLE}</style></head>\n'
            f"<body>{_summary(report, groups)}\n<table id=images><thead>{head}</thead><tbody>\n" + "\n".join(rows)
            + f"\n</tbody></table>\n<script>{SCRIPT}</script></body></html>\n")


def write_html(path: Path, report: Mapping[str, Any], base: Path | None = None) -> Path:
    """Write the page of `report` to `path` atomically; returns the path."""
    from vaetool.io.atomic import atomic_write

    data = render_html(report, base).encode("utf-8")
    atomic_write(path, lambda tmp: tmp.write_bytes(data), overwrite=True)
    return path
