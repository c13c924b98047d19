"""Sharded latents for very large sets: many latents per .safetensors file, plus an index.

A shard `{prefix}-00000.safetensors` holds one tensor per item (tensor key = item key) and, in its
safetensors metadata, "format": "vaetool.shard" and "items": JSON {key: item metadata}. Shards are
written atomically, so a shard on disk is always complete; `{index}` (index.json by default) maps
each key to its shard and shape and is rewritten atomically after every shard. Reopening a folder
resumes: the keys of every complete shard of this prefix are reported by done_keys(), including
a shard whose index update was lost to a kill. The run's provenance (vaetool.jobs.provenance) is
recorded in the index and in every shard. One writer at a time per index: a ShardWriter holds the
lock file `.{index}.lock` (created with O_EXCL) while it is open, and a second process writing the
same shards into the same folder stops with an error naming it (torchrun ranks have their own index).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from vaetool.errors import InputError, OutputError, OutputExistsError
from vaetool.io.atomic import HOST_TAG, atomic_write, pid_alive
from vaetool.io.latent_item import FORMAT_VERSION, SHARD_FORMAT, LatentItem, validate_latent
from vaetool.io.safe import read_safetensors, safetensors_header, write_safetensors

__all__ = [
    "INDEX_FORMAT", "ShardWriteError", "ShardWriter", "load_shard", "load_shard_dir", "merge_shard_indexes", "rank_index_name",
    "read_index", "shard_files", "shard_keys",
]

INDEX_FORMAT = "vaetool.shard_index"


class ShardWriteError(OutputError):
    """A shard that could not be written: its queued items are dropped; a resumed run redoes them."""


def shard_keys(path: Path) -> dict[str, list[int]]:
    """{key: shape} of one shard file, from its header only."""
    header, meta = safetensors_header(path, InputError)
    if meta.get("format") != SHARD_FORMAT:
        raise InputError("not a vaetool shard (no format: vaetool.shard in its metadata)", path)
    return {k: list(v["shape"]) for k, v in header.items()}


def load_shard(path: str | Path) -> list[LatentItem]:
    """Every item of one shard file, in key order, with its metadata."""
    path = Path(path)
    shapes = shard_keys(path)
    _, meta = safetensors_header(path, InputError)
    try:
        items_meta = json.loads(meta.get("items", "{}"))
    except (ValueError, RecursionError):
        raise InputError("corrupt shard metadata (items is not JSON)", path) from None
    if not isinstance(items_meta, dict) or not all(isinstance(v, dict) for v in items_meta.values()):
        raise InputError("corrupt shard metadata (items is not a JSON object of per-item objects)", path)
    tensors = read_safetensors(path, InputError, list(shapes))
    out = []
    for key in sorted(shapes):
        latent = validate_latent(tensors[key], path, f"item {key!r}")  # [1, C, h, w]
        if latent.shape[0] != 1:
            raise InputError(f"item {key!r} has shape {tuple(tensors[key].shape)}; expected [C, h, w]", path)
        out.append(LatentItem(key, latent[0], dict(items_meta.get(key, {})), path))
    return out


def read_index(path: str | Path) -> dict[str, Any]:
    """The parsed index.json of a shard folder ({} items when the file is missing)."""
    path = Path(path)
    if not path.exists():
        return {"format": INDEX_FORMAT, "format_version": FORMAT_VERSION, "items": {}}
    try:
        index = json.loads(path.read_text())
        if not isinstance(index.get("items"), dict):
            raise ValueError("no items")
    except (ValueError, AttributeError) as err:
        raise InputError(f"corrupt shard index: {err}", path) from None
    return index


def rank_index_name(rank: int) -> str:
    """The index file of one torchrun rank's shards (merged into index.json by merge_shard_indexes)."""
    return f"index.rank{rank}.json"


def merge_shard_indexes(directory: str | Path, index_name: str = "index.json") -> dict[str, Any]:
    """Join the torchrun ranks' `index.rank{r}.json` files (and what `index_name` holds) into `index_name`.

    The rank parts stay (each rank resumes from its own); a key listed twice keeps its entry from
    `index_name`, else from the lowest rank. Returns the merged index.
    """
    directory = Path(directory)
    target = directory / index_name
    merged = read_index(target)
    parts = sorted(directory.glob("index.rank*.json"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
    for part in parts:
        for key, entry in read_index(part)["items"].items():
            merged["items"].setdefault(key, entry)
    for part in parts:  # the ranks of one run record the same provenance
        if "provenance" not in merged and "provenance" in (recorded := read_index(part)):
            merged["provenance"] = recorded["provenance"]
    merged.update(format=INDEX_FORMAT, format_version=FORMAT_VERSION)
    data = (json.dumps(merged, indent=1, sort_keys=True) + "\n").encode()
    atomic_write(target, lambda tmp: tmp.write_bytes(data), overwrite=True)
    return merged


def shard_files(directory: Path, prefix: str | None = None) -> list[Path]:
    """The shard files of `prefix` (any prefix when None) in a folder, in name order."""
    pattern = re.compile(rf"^{re.escape(prefix) if prefix else '.+'}-\d{{5,}}\.safetensors$")
    return sorted(p for p in directory.glob("*.safetensors") if pattern.match(p.name))


def load_shard_dir(directory: str | Path) -> list[LatentItem]:
    """Every item of every shard in a folder (shard files in name order, keys sorted within each)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError("no such folder", directory)
    shards = [p for p in shard_files(directory) if safetensors_header(p, InputError)[1].get("format") == SHARD_FORMAT]
    if not shards:
        raise InputError("no vaetool shard files in this folder", directory)
    return [item for shard in shards for item in load_shard(shard)]


class ShardWriter:
    """Collect latents and write them `shard_size` per file; a context manager (closing flushes).

    `overwrite` deletes this prefix's existing shards (and their index entries) when opened.
    Processes sharing a folder (torchrun ranks) need their own `prefix` and `index_name`; a second
    writer of the same index is an OutputError naming its lock file. `provenance` is recorded in the
    index and in every shard's metadata.
    """

    def __init__(
        self,
        out_dir: str | Path,
        shard_size: int,
        *,
        prefix: str = "shard",
        index_name: str = "index.json",
        overwrite: bool = False,
        provenance: dict[str, Any] | None = None,
    ) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, not {shard_size}")
        if not re.fullmatch(r"[\w.]+", prefix):
            raise ValueError(f"shard prefix must be letters, digits, _ or ., not {prefix!r}")
        self.out_dir = Path(out_dir)
        self.shard_size = shard_size
        self.prefix = prefix
        self.index_path = self.out_dir / index_name
        self.overwrite = overwrite
        self.provenance = provenance
        self._pending: dict[str, tuple[torch.Tensor, dict[str, Any]]] = {}
        self._lock: Path | None = _take_lock(self.out_dir / f".{index_name}.lock")
        try:
            self._open(prefix, overwrite)
        except BaseException:
            self._release()
            raise

    def _open(self, prefix: str, overwrite: bool) -> None:
        self._index = read_index(self.index_path)
        self._index.setdefault("items", {})
        existing = shard_files(self.out_dir, prefix) if self.out_dir.is_dir() else []
        if overwrite:
            self._index["items"] = {k: v for k, v in self._index["items"].items() if not _ours(v["shard"], prefix)}
            for shard in existing:
                shard.unlink()
            existing = []
        for shard in existing:  # recover shards whose index update was lost
            for key, shape in shard_keys(shard).items():
                self._index["items"].setdefault(key, {"shard": shard.name, "shape": shape})
        numbers = [int(p.stem.rsplit("-", 1)[1]) for p in existing]
        self._next = max(numbers, default=-1) + 1
        if overwrite or existing:
            self._write_index()

    def done_keys(self) -> set[str]:
        """Keys already written to complete shards (skip these when resuming)."""
        return set(self._index["items"])

    def add(self, key: str, latent: torch.Tensor, metadata: dict[str, Any]) -> None:
        """Queue one latent [C, h, w]; a full shard is written at once."""
        if latent.ndim != 3:
            raise ValueError(f"expected a latent [C, h, w], got {tuple(latent.shape)}")
        if key in self._pending or key in self._index["items"]:
            where = self._index["items"].get(key, {}).get("shard", "this run")
            raise OutputExistsError(f"item {key!r} is already in {where}", self.out_dir)
        self._pending[key] = (latent.detach().to("cpu").contiguous(), dict(metadata))
        if len(self._pending) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write the queued items as one shard (nothing when none are queued), then the index.

        When the shard cannot be written (ShardWriteError), its items are dropped, not retried.
        """
        if not self._pending:
            return
        name = f"{self.prefix}-{self._next:05d}.safetensors"
        tensors = {k: t for k, (t, _) in self._pending.items()}
        header = {"format": SHARD_FORMAT, "format_version": FORMAT_VERSION,
                  "items": json.dumps({k: m for k, (_, m) in self._pending.items()}, sort_keys=True, allow_nan=False)}
        if self.provenance is not None:
            header["provenance"] = json.dumps(self.provenance, sort_keys=True)
        try:
            atomic_write(self.out_dir / name, lambda tmp: write_safetensors(tmp, tensors, header))
        except (OSError, OutputError) as err:  # atomic_write names the file in an OutputError
            count = len(self._pending)
            self._pending.clear()
            reason = err.problem.removeprefix("cannot write: ") if isinstance(err, OutputError) else (err.strerror or str(err)).lower()
            raise ShardWriteError(f"shard {name} not written ({reason}); a resumed run redoes its {count} items",
                                  self.out_dir / name) from err
        self._next += 1
        for key, tensor in tensors.items():
            self._index["items"][key] = {"shard": name, "shape": list(tensor.shape)}
        self._pending.clear()
        self._write_index()

    def _write_index(self) -> None:
        self._index.update(format=INDEX_FORMAT, format_version=FORMAT_VERSION)
        if self.provenance is not None:
            self._index["provenance"] = self.provenance
        data = (json.dumps(self._index, indent=1, sort_keys=True) + "\n").encode()
        atomic_write(self.index_path, lambda tmp: tmp.write_bytes(data), overwrite=True)

    def close(self) -> None:
        """Write what is still queued, then let go of the folder's lock."""
        try:
            self.flush()
        finally:
            self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.unlink(missing_ok=True)
            self._lock = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        if kind is None:
            self.close()
            return
        # the queued items are complete: keep them even when the run fails (the run's own error propagates)
        with contextlib.suppress(Exception):
            self.close()
        self._release()


def _lock_holder(lock: Path) -> tuple[str, int] | None:
    """(host tag, pid) written in a lock file (None: unreadable, e.g. being written)."""
    try:
        host, pid = lock.read_text().split()
        return host, int(pid)
    except (OSError, ValueError):
        return None


def _take_lock(lock: Path) -> Path:
    """Create `lock` with O_EXCL (taking over one left by a dead process of this machine); OutputError when it is held."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            holder = _lock_holder(lock)
            if holder is not None and holder[0] == HOST_TAG and not pid_alive(holder[1]):
                lock.unlink(missing_ok=True)  # its process was killed: the lock is stale
                continue
            who = f"pid {holder[1]} on this machine" if holder and holder[0] == HOST_TAG else "another machine or process"
            raise OutputError(f"another vaetool run ({who}) is writing shards into this folder; wait for it, or give this "
                              "run another --output folder (delete this lock file if no run is writing)", lock) from None
        except OSError as err:
            raise OutputError(f"cannot create the shard lock file: {err.strerror or err}", lock) from None
        with os.fdopen(fd, "w") as f:
            f.write(f"{HOST_TAG} {os.getpid()}\n")
        return lock
    raise OutputError("cannot take the shard lock file (it keeps reappearing)", lock)


def _ours(shard: str, prefix: str) -> bool:
    return re.fullmatch(rf"{re.escape(prefix)}-\d{{5,}}\.safetensors", shard) is not None
