"""Atomic file writes: a hidden temp file in the target's directory, fsync, then a rename or a link.

A reader never sees a half-written output, a killed writer leaves at most a hidden temp file
(`.{name}.vaetool-{host}-{pid}-{token}.tmp`, never mistaken for an output; `remove_stale_temps`
cleans them up), and without `overwrite` the final step is os.link, which fails instead of
replacing a file another process wrote in the meantime. Every output gets the mode a plain new
file gets (0666 less the umask), whatever the writer did to its temp file.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path

from vaetool.errors import OutputError, OutputExistsError

__all__ = ["TEMP_PATTERN", "atomic_write", "is_temp_name", "pid_alive", "remove_stale_temps", "temp_path"]

HOST_TAG = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]  # temps of other machines on shared storage
TEMP_PATTERN = re.compile(r"^\..+\.vaetool-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]+\.tmp$")
# link(2) unsupported by the filesystem: fall back to an exists-check + rename
_NO_LINK_ERRNOS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV, errno.EMLINK, errno.EACCES}


def temp_path(path: Path) -> Path:
    """A fresh hidden temp path next to `path` (unique per host, process and call)."""
    return path.with_name(f".{path.name}.vaetool-{HOST_TAG}-{os.getpid()}-{secrets.token_hex(4)}.tmp")


def is_temp_name(name: str) -> bool:
    """Whether a file name is one of atomic_write's temp files."""
    return TEMP_PATTERN.match(name) is not None


def _reason(err: OSError) -> str:
    return err.strerror or type(err).__name__


def _prepare_dir(directory: Path) -> None:
    """Create `directory` (and parents); OutputError naming it when that fails or it is not writable."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError("cannot create the output directory: a file of that name exists", directory) from None
    except OSError as err:
        raise OutputError(f"cannot create the output directory: {_reason(err)}", directory) from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OutputError("output directory is not writable (permission denied)", directory)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    """Persist a rename (best effort: not every platform can open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    """Move a complete temp file to `path`: replace when overwriting, else link (never clobbers)."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise OutputExistsError("already exists (use --overwrite to replace it)", path) from None
    except OSError as err:
        if err.errno not in _NO_LINK_ERRNOS:
            raise
        if path.exists():  # no hard links here: a small race window remains
            raise OutputExistsError("already exists (use --overwrite to replace it)", path) from None
        os.replace(tmp, path)
        return
    tmp.unlink()


def atomic_write(path: str | Path, write: Callable[[Path], None], *, overwrite: bool = False) -> None:
    """Run `write(temp_path)`, fsync, then publish the file at `path` atomically.

    Parent directories are created. Without `overwrite` an existing `path` is an OutputExistsError
    (checked before writing and again, race-free, when publishing). The temp file is removed on
    any error; OS errors become one-line OutputErrors naming the file or directory.
    """
    path = Path(path)
    _prepare_dir(path.parent)
    if not overwrite and path.exists():
        raise OutputExistsError("already exists (use --overwrite to replace it)", path)
    tmp = temp_path(path)
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # reserve the name; the umask applies
        mode = stat.S_IMODE(os.stat(tmp).st_mode)
        write(tmp)
        if stat.S_IMODE(os.stat(tmp).st_mode) != mode:  # a writer that replaced the file (some use 0600)
            os.chmod(tmp, mode)
        _fsync_file(tmp)
        _publish(tmp, path, overwrite)
    except OSError as err:
        if isinstance(err, OutputError):
            raise
        raise OutputError(f"cannot write: {_reason(err)}", path) from None
    finally:
        tmp.unlink(missing_ok=True)  # no-op after a successful publish
    _fsync_dir(path.parent)


def pid_alive(pid: int) -> bool:
    """Whether a process of this machine with this pid exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(directory: str | Path, *, recursive: bool = True, max_age_s: float = 24 * 3600) -> int:
    """Delete temp files left by killed writers under `directory`; returns how many were removed.

    A temp of this machine is stale when its process is gone; one written by another machine
    (shared storage) only when it is older than `max_age_s`.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    candidates = directory.rglob(".*.tmp") if recursive else directory.glob(".*.tmp")
    removed = 0
    now = time.time()
    for candidate in candidates:
        m = TEMP_PATTERN.match(candidate.name)
        if m is None or not candidate.is_file():
            continue
        try:
            if m["host"] == HOST_TAG:
                stale = int(m["pid"]) != os.getpid() and not pid_alive(int(m["pid"]))
            else:
                stale = now - candidate.stat().st_mtime > max_age_s
            if stale:
                candidate.unlink()
                removed += 1
        except FileNotFoundError:  # its writer finished or another cleaner was faster
            continue
    return removed
