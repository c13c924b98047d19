"""JSONL manifests of what a run wrote: one record per line, flushed as it is written.

Each run appends a header {"type": "run", "run_id", "started", "settings", "vaetool_version"} and then
one record per input {"type": "item", "run_id", "source", "output", "status", ...}; a manifest holds
every run into a folder, so `read_manifest` returns the latest record of each input (what is on disk
now) and `read_records` every line. Under torchrun the ranks' parts become one run (rank 0's id).
A killed run leaves whole lines and at most one torn last line; reading skips lines that are not
complete JSON objects, and appending first ends a torn line so new records stay whole. Under
torchrun each rank writes `manifest.rank{r}.jsonl` next to the manifest; merge_manifests joins
the parts into the manifest (atomically) in a deterministic order.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

from vaetool.errors import OutputError
from vaetool.io.atomic import atomic_write

__all__ = ["ManifestWriter", "latest_per_input", "merge_manifests", "new_run_id", "rank_manifest_path", "rank_manifest_paths",
           "read_manifest", "read_records", "run_headers"]

STATUSES = ("written", "skipped", "failed")  # the usual values of "status"


def new_run_id() -> str:
    """A fresh run id (uuid4 hex)."""
    return uuid.uuid4().hex


class ManifestWriter:
    """Append JSON records to a .jsonl file, one flushed line each (safe to call from several threads).

    Every record carries `run_id` (a new one unless given); `start_run` writes the run's header.
    """

    def __init__(self, path: str | Path, *, append: bool = True, run_id: str | None = None) -> None:
        self.path = Path(path)
        self.run_id = run_id or new_run_id()
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

    def start_run(self, settings: dict[str, Any]) -> None:
        """Append this run's header: {"type": "run", "run_id", "started" (UTC, ISO 8601), "settings", "vaetool_version"}."""
        from vaetool import __version__

        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.write({"type": "run", "run_id": self.run_id, "started": started, "settings": settings,
                    "vaetool_version": __version__})

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
        """Append {type: item, run_id, source, output, size, status, error, ...}; paths are stored as strings."""
        self.write({"type": "item", "run_id": self.run_id, "source": str(source), "output": None if output is None else str(output),
                    "size": size, "status": status, "error": error, **extra})

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


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a .jsonl manifest (run headers too), skipping torn or non-object lines ([] when missing)."""
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


def is_header(record: dict[str, Any]) -> bool:
    """Whether a record is a run header."""
    return record.get("type") == "run"


def run_headers(path: str | Path) -> list[dict[str, Any]]:
    """The run headers of a manifest, oldest first."""
    return [r for r in read_records(path) if is_header(r)]


def latest_per_input(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last item record of each input (by "source"), in the order those records were written."""
    latest: dict[str, int] = {}
    for i, record in enumerate(records):
        if not is_header(record) and "source" in record:
            latest[str(record["source"])] = i
    return [records[i] for i in sorted(latest.values())]


def read_manifest(path: str | Path) -> list[dict[str, Any]]:
    """The latest record of each input in a manifest (what its last run did to it); headers and older records left out."""
    return latest_per_input(read_records(path))


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
    """Append the rank part files of this run to `path` as one run, atomically; returns every record of `path`.

    What `path` holds (earlier runs) stays first, so the latest record of an input is still the last.
    The parts' headers become one (rank 0's run id, with the world size) and their records take that
    id, ordered by (source, output, then the record's own text): the same whatever the number of ranks.
    """
    path = Path(path)
    parts = rank_manifest_paths(path)
    earlier = read_records(path)
    records = [r for part in parts for r in read_records(part)]
    headers = [r for r in records if is_header(r)]
    run_id = headers[0].get("run_id") if headers else None
    merged: list[dict[str, Any]] = []
    if headers:
        settings = dict(headers[0].get("settings") or {}) | {"world_size": len(parts)}
        settings.pop("rank", None)
        merged.append(headers[0] | {"settings": settings})
    items = [r | ({"run_id": run_id} if run_id else {}) for r in records if not is_header(r)]
    merged += sorted(items, key=lambda r: (str(r.get("source", "")), str(r.get("output", "")), _line(r)))
    data = "".join(_line(r) for r in earlier + merged).encode()
    atomic_write(path, lambda tmp: tmp.write_bytes(data), overwrite=True)
    if remove_parts:
        for part in parts:
            part.unlink(missing_ok=True)
    return read_records(path)
