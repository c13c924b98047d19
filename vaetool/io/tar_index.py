"""The shard index of a tar-shard encode: which input shards are finished, with the run's provenance.

`OUT/shards.json` (or `shards.rank{r}.json` per torchrun rank, merged into shards.json by rank 0) is
{"format": "vaetool.tar_index", "provenance": {...}, "shards": {output tar name: {"input", "complete",
"samples", "failed": [{"key", "reason"}]}}}, rewritten atomically after every finished shard.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vaetool.errors import InputError
from vaetool.io.atomic import atomic_write

__all__ = ["SHARD_INDEX_FORMAT", "merge_tar_indexes", "read_tar_index", "tar_index_name", "write_tar_index"]

SHARD_INDEX_FORMAT = "vaetool.tar_index"


def tar_index_name(rank: int, world: int) -> str:
    """The shard index this process writes: shards.json, or shards.rank{r}.json under torchrun."""
    return "shards.json" if world == 1 else f"shards.rank{rank}.json"


def read_tar_index(path: Path) -> dict[str, Any]:
    """The parsed shard index ({} shards when the file is missing); a corrupt one is an InputError naming it."""
    if not path.exists():
        return {"format": SHARD_INDEX_FORMAT, "shards": {}}
    try:
        index = json.loads(path.read_text())
        if not isinstance(index, dict) or not isinstance(index.get("shards"), dict):
            raise ValueError("no shards")
    except (ValueError, UnicodeDecodeError):
        raise InputError("corrupt shard index (not a vaetool tar index): remove it to redo every shard", path) from None
    return index


def merge_tar_indexes(out_dir: Path) -> dict[str, Any]:
    """Rank 0 after the barrier: fold every shards.rank*.json into shards.json (atomically) and remove the parts."""
    merged = read_tar_index(out_dir / "shards.json")
    parts = sorted(out_dir.glob("shards.rank*.json"))
    for part in parts:
        index = read_tar_index(part)
        merged["shards"].update(index["shards"])
        if index["shards"]:  # the latest run's settings (the same in every part unless --overwrite changed them)
            merged["provenance"] = index.get("provenance")
    write_tar_index(out_dir / "shards.json", merged)
    for part in parts:
        part.unlink(missing_ok=True)
    return merged


def write_tar_index(path: Path, index: dict[str, Any]) -> None:
    """Write a shard index atomically (sorted keys: equal indexes, equal bytes)."""
    text = json.dumps(index, indent=1, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text), overwrite=True)
