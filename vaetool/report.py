"""Run reports for scripts and CI: a JSON document, JUnit XML (one test case per image) and the roundtrip table.

The table (`roundtrip_table`) and the HTML page (vaetool.report_html) are both drawn from the
roundtrip report document alone, so what a person sees is what a script reads.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.table import Table

METRICS = ("psnr", "ssim", "max_diff")  # the metric keys of the report, in table order
OK_STATUSES = ("passed", "updated", "unchanged", "ok")
RULES = "    \n    \n ── \n    \n ── \n    \n    \n    \n"  # rich Box: rules under the header and above the overall row only
LIMITS = (("min_psnr", "PSNR", ">="), ("min_ssim", "SSIM", ">="), ("max_diff", "max", "<="))  # thresholds key, label, pass when


@dataclass(frozen=True)
class Case:
    """One test case of a JUnit report: an image and what happened to it."""

    name: str
    seconds: float | None = None  # left out of the XML when unknown
    failures: tuple[str, ...] = ()  # regressions: the limits it broke
    error: str | None = None  # it could not be processed at all
    output: str = ""  # metrics and paths, shown by CI systems as the case's stdout

    @property
    def outcome(self) -> str:
        """passed, failed or error."""
        return "error" if self.error is not None else "failed" if self.failures else "passed"


def junit_tree(
    suite: str, cases: Sequence[Case], properties: dict[str, str] | None = None, seconds: float | None = None
) -> ET.ElementTree:
    """A JUnit XML document (<testsuites><testsuite><testcase>...) for `cases`; `seconds`: the run's wall time."""
    counts = {"tests": len(cases), "failures": 0, "errors": 0, "skipped": 0}
    for case in cases:
        counts["failures"] += case.outcome == "failed"
        counts["errors"] += case.outcome == "error"
    total = seconds if seconds is not None else sum(c.seconds or 0.0 for c in cases)
    root = ET.Element("testsuites", {"name": suite, **{k: str(v) for k, v in counts.items()}, "time": f"{total:.3f}"})
    node = ET.SubElement(root, "testsuite", {"name": suite, **{k: str(v) for k, v in counts.items()}, "time": f"{total:.3f}"})
    if properties:
        props = ET.SubElement(node, "properties")
        for key, value in properties.items():
            ET.SubElement(props, "property", {"name": key, "value": value})
    for case in cases:
        attrs = {"classname": suite, "name": case.name}
        if case.seconds is not None:
            attrs["time"] = f"{case.seconds:.3f}"
        tc = ET.SubElement(node, "testcase", attrs)
        if case.error is not None:
            ET.SubElement(tc, "error", {"message": case.error}).text = case.error
        elif case.failures:
            message = "; ".join(case.failures)
            ET.SubElement(tc, "failure", {"message": message, "type": "regression"}).text = "\n".join(case.failures)
        if case.output:
            ET.SubElement(tc, "system-out").text = case.output
    ET.indent(root)
    return ET.ElementTree(root)


def write_junit(
    path: Path, suite: str, cases: Sequence[Case], properties: dict[str, str] | None = None, seconds: float | None = None
) -> Path:
    """Write the JUnit XML of `cases` to `path` atomically; returns the path."""
    from vaetool.io.atomic import atomic_write

    tree = junit_tree(suite, cases, properties, seconds)
    data = ET.tostring(tree.getroot(), encoding="utf-8", xml_declaration=True) + b"\n"
    atomic_write(path, lambda tmp: tmp.write_bytes(data), overwrite=True)
    return path


def write_json(path: Path, report: dict[str, Any]) -> Path:
    """Write `report` as indented JSON to `path` atomically (inf/NaN refused: callers write null)."""
    from vaetool.io.atomic import atomic_write

    data = (json.dumps(report, indent=2, allow_nan=False) + "\n").encode()
    atomic_write(path, lambda tmp: tmp.write_bytes(data), overwrite=True)
    return path


def metric_text(key: str, metrics: Mapping[str, Any] | None) -> str:
    """One metric of a report's metrics dict as shown to a person: PSNR 2 decimals (inf when identical), SSIM 4, max diff."""
    if metrics is None:
        return "-"
    value = metrics.get(key)
    if key == "psnr" and value is None and metrics.get("max_diff") == 0:
        return "inf"  # the report writes the PSNR of identical images as null
    if value is None:
        return "-"
    return {"psnr": f"{value:.2f}", "ssim": f"{value:.4f}"}.get(key, str(value))


def limits_text(report: Mapping[str, Any]) -> str:
    """The pass limits in one line, e.g. 'limits vs golden: PSNR >= 40, SSIM >= 0.98, max <= 8' ('' when none)."""
    t = report["thresholds"]
    parts = [f"{label} {op} {t[key]:g}" for key, label, op in LIMITS if t.get(key) is not None]
    return f"limits vs {report['thresholds_against']}: {', '.join(parts)}" if parts else ""


def roundtrip_table(report: Mapping[str, Any]) -> Table:
    """The roundtrip report as a Rich table that reads at 80 columns: one row per image, an overall row, broken limits in red."""
    from rich.box import Box
    from rich.markup import escape
    from rich.table import Table

    model = report["model"]
    weights = f" + {Path(model['checkpoint']).name}" if model.get("checkpoint") else ""
    images = report["images"]
    against = report["thresholds_against"]
    groups = ["input", "golden"] if report["golden"] is not None else ["input"]
    caption = "PSNR in dB; max: largest |difference| in 8-bit levels"
    if report["update_golden"]:
        caption += "; golden: as stored before this run"
    caption = "; ".join(x for x in (caption, limits_text(report)) if x)
    table = Table(title=f"roundtrip: {len(images)} images, model {model.get('config') or ''}{weights}", title_justify="left",
                  caption=caption, caption_justify="left", box=Box(RULES), pad_edge=False, show_edge=False, collapse_padding=True)
    table.add_column("image", overflow="fold", min_width=8)  # the only column that folds when the terminal is narrow
    table.add_column("size", justify="right", no_wrap=True)
    for group in groups:
        for label in ("PSNR", "SSIM", "max"):
            table.add_column(f"{label}\n{group}", justify="right", no_wrap=True)
    table.add_column("status", no_wrap=True)

    def cells(metrics: Mapping[str, Any] | None, broken: Sequence[str]) -> list[str]:
        return [f"[red]{metric_text(k, metrics)}[/red]" if k in broken else metric_text(k, metrics) for k in METRICS]

    for row in images:
        size = "-" if row["width"] is None else f"{row['width']}x{row['height']}"
        cols = [escape(row["image"]), size]
        for group in groups:
            cols += cells(row[f"vs_{group}"], row.get("limits_broken", []) if group == against else [])
        status = row["status"]
        table.add_row(*cols, status if status in OK_STATUSES else f"[red]{status}[/red]")
    if table.rows:
        table.rows[-1].end_section = True  # a rule above the overall row
    overall = report["overall"]
    cols = [f"overall ({overall['vs_input']['images']})", ""]
    for group in groups:
        cols += cells(overall[f"vs_{group}"], [])
    table.add_row(*cols, "passed" if report["passed"] else "[red]failed[/red]", style="bold")
    return table
