"""Run reports for scripts and CI: a JSON document and JUnit XML (one test case per image)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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
