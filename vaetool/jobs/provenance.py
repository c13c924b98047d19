"""What makes an existing output this run's own, so a resume never keeps an output of other settings.

Every output records its run's provenance: the weights (sha256), the config, the dtype, the tiling,
and per command the latent form, the posterior (mode, or sample and seed) for encode, the source
latent's sha256 and the form it was read in for decode. It goes in the safetensors metadata
("provenance", JSON), the shard index and every shard, or a PNG text chunk ("vaetool.provenance").
Before any model work a rerun reads it back (a safetensors header, a PNG's text chunks without its
pixels) and skips an output only when every field equals this run's; any other existing output
stops the run with a StaleOutputError (exit 2) naming the first few files and the field that differs.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vaetool.errors import InputError, StaleOutputError, VaeToolError

if TYPE_CHECKING:
    from vaetool.api import Vae
    from vaetool.tiling import Tiling

__all__ = [
    "PNG_KEY", "PROVENANCE_KEY", "SourceHashes", "StaleOutputs", "check_output", "latent_provenance", "mismatch", "model_provenance",
    "png_provenance", "tiling_text",
]  # fmt: skip

PROVENANCE_KEY = "provenance"  # safetensors metadata key and shard index key (a JSON object)
PNG_KEY = "vaetool.provenance"  # PNG text chunk (a JSON object)
NO_PROVENANCE = "no provenance recorded (written by an older vaetool or another tool)"
SHOWN = 3  # mismatching outputs named in the error


def tiling_text(tiling: Tiling) -> str:
    """The tiling a run asked for, as recorded: the mode, plus tile size and overlap when they are set."""
    parts = [tiling.mode]
    if tiling.tile_size is not None:
        parts.append(f"tile {tiling.tile_size}")
    if tiling.overlap is not None:
        parts.append(f"overlap {tiling.overlap}")
    return " ".join(parts)


def model_provenance(vae: Vae, tiling: Tiling) -> dict[str, Any]:
    """The fields every output of a model shares: weights sha256, config, dtype, tiling."""
    src = vae.source
    fields = {
        "checkpoint_sha256": src.get("sha256") or ("random-weights" if src.get("random_weights") else None),
        "config": src.get("config_name") or src.get("config"),
        "dtype": str(vae.dtype).removeprefix("torch."),
        "tiling": tiling_text(tiling),
    }
    return fields | ({"random_weights": True} if src.get("random_weights") else {})  # also in the manifest's run header


def _shown(value: Any) -> str:
    if value is None:
        return "not recorded"
    if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value):
        return f"sha256 {value[:12]}..."  # enough to tell two apart
    return value if isinstance(value, str) else json.dumps(value)


def mismatch(recorded: Any, expected: dict[str, Any]) -> str | None:
    """Why `recorded` (a file's provenance) is not `expected` (this run's): the first differing field; None when equal."""
    if not isinstance(recorded, dict):
        return NO_PROVENANCE
    for key, value in expected.items():
        if recorded.get(key) != value:
            return f"{key}: {_shown(recorded.get(key))} there, {_shown(value)} in this run"
    return None


def _parse(text: str | None, path: Path) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        raise InputError("corrupt provenance (not JSON)", path) from None


def latent_provenance(path: Path) -> Any:
    """The provenance a vaetool .safetensors file (a latent or a shard) records, from its header only (None: none)."""
    from vaetool.io.safe import safetensors_header

    _, meta = safetensors_header(path, InputError)
    return _parse(meta.get(PROVENANCE_KEY), path)


def png_provenance(path: Path) -> Any:
    """The provenance a PNG records in its text chunks before the image data; its pixels are not decoded."""
    from PIL import Image

    try:
        with Image.open(path, formats=("PNG",)) as im:  # reads the chunks up to the first IDAT only
            text = im.info.get(PNG_KEY)
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise InputError(f"not a readable PNG: {err}", path) from None
    return _parse(text if isinstance(text, str) else None, path)


def check_output(path: Path, expected: dict[str, Any], read: Callable[[Path], Any]) -> str | None:
    """Why the existing output `path` is not this run's (None: it is), reading its provenance with `read`."""
    try:
        return mismatch(read(path), expected)
    except (VaeToolError, OSError) as err:
        problem = err.problem if isinstance(err, VaeToolError) else (err.strerror or str(err))
        return f"cannot read its provenance ({problem})"


class StaleOutputs:
    """Existing outputs that are not this run's, collected before any work; `raise_if_any` stops the run."""

    def __init__(self) -> None:
        self.found: list[tuple[Path, str]] = []

    def add(self, path: Path, reason: str) -> None:
        """Note one existing output that differs, and why."""
        self.found.append((path, reason))

    def raise_if_any(self, out_dir: Path) -> None:
        """StaleOutputError naming the first few outputs and the field that differs, and how to go on."""
        if not self.found:
            return
        count = len(self.found)
        named = "; ".join(f"{path}: {reason}" for path, reason in self.found[:SHOWN])
        more = f"; and {count - SHOWN} more" if count > SHOWN else ""
        raise StaleOutputError(
            f"{count} existing output{'s' if count > 1 else ''} in {out_dir} came from another run with other settings "
            f"({named}{more}); nothing was written: rerun with --overwrite to replace them, or choose another --output folder"
        )


class SourceHashes:
    """sha256 of source files, each hashed once per run (safe to call from loader threads)."""

    def __init__(self) -> None:
        self._known: dict[Path, str] = {}
        self._lock = threading.Lock()

    def __call__(self, path: Path) -> str:
        """The hex sha256 of `path` (computed on first use)."""
        from vaetool.hashing import hash_file

        with self._lock:
            if path in self._known:
                return self._known[path]
        digest = hash_file(path)
        with self._lock:
            self._known[path] = digest
        return digest
