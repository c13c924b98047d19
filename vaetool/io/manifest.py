"""JSONL manifests of what a run wrote: one record per line, flushed as it is written.

A killed run leaves whole lines and at most one torn last line; reading skips lines that are not
complete JSON objects, and appending first ends a torn line so new records stay whole. Under
torchrun each rank writes `manifest.rank{r}.jsonl` next to the manifest; merge_manifests joins
the parts into the manifest (atomically) in a deterministic order.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

from vaetool.errors import OutputError
from vaetool.io.atomic import atomic_write

__all__ = ["ManifestWriter", "merge_manifests", "rank_manifest_path", "rank_manifest_paths", "read_manifest"]

STATUSES = ("written", "skipped", "failed")  # the usual values of "status"


class ManifestWriter:
    """Append JSON records to a .jsonl file, one flushed line each (safe to call from several threads)."""

    def __init__(self, path: str | Path, *, append: bool = True) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            torn = append and self.path.exists() and self.path.stat().st_size > 0 and not _ends_with_newline(self.path)
            self._file = self.path.open("a" if append else "w", encoding="utf-8")
        except OSError as err:
            raise OutputError(f"cannot write the manifest: {err.strerror or err}", self.path) from None
        if torn:
            self._file.write("\n")  # end the torn line of a killed run; readers skip it
            self._file.flush()

    def write(self, record: dict[str, Any]) -> None:
        """Append one record as a single JSON line and flush it."""
        line = _line(record)
        with self._lock:
            try:
                self._file.write(line)
                self._file.flush()
            except OSError as err:  # a full disk: the run cannot record what it does
                raise OutputError(f"cannot write the manifest: {err.strerror or err}", self.path) from None

    def record(
        self,
        source: str | Path,
        output: str | Path | None,
        status: str,
        *,
        size: int | None = None,
        error: str | None = None,
        **extra: Any,
    ) -> None:
        """Append {source, output, size, status, error, ...}; paths are stored as strings."""
        self.write({"source": str(source), "output": None if output is None else str(output), "size": size,
                    "status": status, "error": error, **extra})

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            try:
                self._file.close()
            except OSError as err:  # the last buffered line could not be written either
                raise OutputError(f"cannot write the manifest: {err.strerror or err}", self.path) from None

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def _line(record: dict[str, Any]) -> str:
    text = json.dumps(record, sort_keys=True, default=str, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a file name that is not UTF-8: \udcff escapes keep it exact and the line valid JSON
        text = json.dumps(record, sort_keys=True, default=str)
    return text + "\n"


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(-1, 2)
        return f.read(1) == b"\n"


def read_manifest(path: str | Path) -> list[dict[str, Any]]:
    """The records of a .jsonl manifest, skipping torn or non-object lines ([] when the file is missing)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    with path.open("rb") as f:
        for raw in f:
            try:
                record = json.loads(raw)
            except ValueError:  # torn line (killed mid-write) or stray bytes
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def rank_manifest_path(path: str | Path, rank: int) -> Path:
    """The part file of one rank: manifest.jsonl -> manifest.rank{rank}.jsonl next to it."""
    path = Path(path)
    return path.with_name(f"{path.stem}.rank{rank}{path.suffix or '.jsonl'}")


def rank_manifest_paths(path: str | Path) -> list[Path]:
    """Existing part files of `path`, in rank order."""
    path = Path(path)
    pattern = re.compile(rf"^{re.escape(path.stem)}\.rank(\d+){re.escape(path.suffix or '.jsonl')}$")
    parts = [(int(m[1]), p) for p in path.parent.glob(f"{path.stem}.rank*") if (m := pattern.match(p.name))]
    return [p for _, p in sorted(parts)]


def merge_manifests(path: str | Path, *, remove_parts: bool = True) -> list[dict[str, Any]]:
    """Join the rank part files (and any records already in `path`) into `path`, sorted by source.

    Records are ordered by (source, output, then the record's own text), so the result is the
    same whatever the number of ranks. Returns the merged records in that order.
    """
    path = Path(path)
    parts = rank_manifest_paths(path)
    records = read_manifest(path) + [r for part in parts for r in read_manifest(part)]
    lines = sorted((str(r.get("source", "")), str(r.get("output", "")), _line(r)) for r in records)
    data = "".join(line for _, _, line in lines).encode()
    atomic_write(path, lambda tmp: tmp.write_bytes(data), overwrite=True)
    records = [json.loads(line) for _, _, line in lines]
    if remove_parts:
        for part in parts:
            part.unlink(missing_ok=True)
    return records
