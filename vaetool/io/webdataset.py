"""WebDataset tar shards: shard specs with braces, samples streamed from tars or `pipe:` commands, and a tar writer.

Decision: shards are streamed with the standard library's `tarfile` in streaming mode ("r|*": plain,
gzip, bzip2 or xz, read front to back, never seeking), not with the `webdataset` package. That
package would add a dependency, and it raises on a corrupt member where we must name the member and
go on; we also need exact control of the `pipe:` process (its exit status, the tail of its stderr,
killing it when the reader stops early) and of atomic output.

A sample is a run of consecutive members sharing a key, WebDataset's rule: the member path up to the
first dot of its basename (`dir/a.b.jpg` -> key `dir/a`, extension `b.jpg`; a leading `./` is
dropped). Its image is the member whose last extension (lowercased) is an image suffix; the other
members are its extras by extension. As in WebDataset, members without an extension or whose
basename starts with a dot (macOS `._a.jpg`) are skipped, and so are directories, links and devices.
Whatever cannot be a sample becomes a BadSample naming its key and member, and reading goes on: no
image member or two, two members with one extension, a member or sample over `max_member_bytes`
(skipped unread), a member name that could escape an output folder (`..`, `.` or empty parts,
absolute, NUL or control characters, not UTF-8), a key that an earlier sample of the shard had. A
truncated or corrupt tar (also one that ends without its end-of-archive blocks, or with an extended
header over 1 MiB) ends its shard with one BadSample naming the sample being read, which is dropped.
Memory holds one sample, the keys seen in the shard and 4 KiB of a command's stderr. Brace expansion
of shard specs lives in vaetool.io.shard_specs (expand_shards and is_shard_spec are re-exported here).
"""

from __future__ import annotations

import contextlib
import io
import lzma
import os
import signal
import subprocess
import tarfile
import threading
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, cast

from vaetool.errors import InputError, OutputError, OutputExistsError, UsageError, check_utf8_name, first_line, printable
from vaetool.io.atomic import atomic_write, temp_path
from vaetool.io.images import IMAGE_SUFFIXES
from vaetool.io.shard_specs import PIPE, TAR_SUFFIXES, expand_shards, is_shard_spec

__all__ = ["MAX_MEMBER_BYTES", "TAR_SUFFIXES", "BadSample", "Sample", "TarWriter", "expand_shards", "is_shard_spec", "iter_samples"]

MAX_MEMBER_BYTES = 256 * 2**20
MAX_HEADER_BYTES = 2**20  # pax / GNU long-name data, which tarfile reads whole into memory
META_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
STDERR_TAIL = 4096
EXIT_WAIT_S = 30.0  # for a command to exit once its output has ended
CORRUPT = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError)  # bz2 and gzip raise OSError
# the header error that ended a stream -> what it means (EOFHeaderError, a block of zeros, is the clean end)
END_PROBLEMS: dict[type[Exception], str] = {
    tarfile.EmptyHeaderError: "it ends without the end-of-archive blocks (cut off?)",
    tarfile.TruncatedHeaderError: "it ends inside a member header",
}


@dataclass(frozen=True)
class Sample:
    """One sample: its key, its image member's name and bytes, its other members' bytes by extension (no dot)."""

    key: str
    image_member: str
    image: bytes
    extras: dict[str, bytes]


@dataclass(frozen=True)
class BadSample:
    """A sample, or a shard's rest, that cannot be used: its key ("" if unknown), the member at fault, why."""

    key: str
    member: str
    reason: str
    fatal: bool = False  # the shard itself broke here (truncated, corrupt, its command failed): the rest of it is lost


# ---- member names ----


def _name_problem(name: str) -> str | None:
    """Why a member name must not become part of an output path, or None."""
    if "\0" in name:
        return "NUL in the member name"
    if printable(name) != name:
        return "member name is not valid UTF-8"
    if any(ord(c) < 32 or c == "\x7f" for c in name):
        return "control character in the member name"
    if name.startswith("/"):
        return "absolute member path"
    parts = name.split("/")
    if ".." in parts:
        return "'..' in the member path"
    if "" in parts or "." in parts:
        return "empty or '.' part in the member path"
    return None


def _split(name: str) -> tuple[str, str] | None:
    """(key, extension) of a member path by WebDataset's rule, or None for a member without either."""
    folder, slash, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (folder + slash + stem, ext) if stem and dot and ext else None


# ---- reading ----


class _Group:
    """The members of the sample being assembled (at most max_bytes in all)."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.members: list[tuple[str, str, bytes]] = []  # (member name, extension, data)
        self.size = 0
        self.bad: BadSample | None = None

    def fail(self, member: str, reason: str) -> None:
        if self.bad is None:
            self.bad = BadSample(printable(self.key), printable(member), reason)
            self.members.clear()

    def result(self, images: frozenset[str]) -> Sample | BadSample:
        if self.bad is not None:
            return self.bad
        found = [m for m in self.members if m[1].rpartition(".")[2] in images]
        if len(found) != 1:
            member = found[1][0] if found else self.members[0][0]
            return BadSample(self.key, member, "no image member" if not found else f"two image members ({found[0][0]}, {member})")
        extras = {ext: data for name, ext, data in self.members if name != found[0][0]}
        return Sample(self.key, found[0][0], found[0][2], extras)


class _Broken(Exception):
    def __init__(self, bad: BadSample) -> None:
        self.bad = bad


def _tarinfo_class(end: list[Exception]) -> type[tarfile.TarInfo]:
    """A TarInfo that records the header error ending the stream in `end` and refuses huge extended headers."""

    class Probe(tarfile.TarInfo):
        @classmethod
        def frombuf(cls, buf: bytes, encoding: str, errors: str) -> tarfile.TarInfo:
            info = super().frombuf(buf, encoding, errors)
            if info.type in META_TYPES and info.size > MAX_HEADER_BYTES:
                raise tarfile.InvalidHeaderError(f"an extended header of {info.size} bytes (the limit is {MAX_HEADER_BYTES})")
            return info

        @classmethod
        def fromtarfile(cls, tf: tarfile.TarFile) -> tarfile.TarInfo:
            try:
                return super().fromtarfile(tf)
            except tarfile.HeaderError as err:
                end.append(err)
                raise

    return Probe


def _end_problem(end: list[Exception]) -> str | None:
    """What is wrong with how a tar stream ended (None: it ended on its end-of-archive block)."""
    if not end or isinstance(end[-1], tarfile.EOFHeaderError):
        return None
    return END_PROBLEMS.get(type(end[-1]), f"corrupt member header: {first_line(end[-1])}")


def _read(stream: IO[bytes], images: frozenset[str], max_bytes: int) -> Iterator[Sample | BadSample]:
    """The samples of a tar stream; _Broken (naming the dropped sample) when the tar is truncated or corrupt."""
    end: list[Exception] = []
    group: _Group | None = None
    seen: set[str] = set()
    reading = ""
    try:
        tf = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_tarinfo_class(end), encoding="utf-8", errors="surrogateescape")  # noqa: SIM115  # the caller closes `stream`
        while (info := tf.next()) is not None:
            tf.members.clear()  # streaming: keep no list of every member
            name = info.name
            while name.startswith("./"):
                name = name[2:]
            if not info.isreg() or (split := _split(name)) is None:
                continue
            key, ext = split
            if group is None or key != group.key:
                if group is not None:
                    yield group.result(images)
                group = _Group(key)
                if key in seen:
                    group.fail(name, "its key repeats an earlier sample's (members of a sample must be consecutive)")
                seen.add(key)
            ext = ext.lower()
            if (problem := _name_problem(name)) is not None:
                group.fail(name, problem)
            elif info.size > max_bytes or group.size + info.size > max_bytes:
                what = "member" if info.size > max_bytes else "sample"
                group.fail(name, f"{what} larger than the limit of {max_bytes} bytes ({info.size} bytes in this member)")
            elif any(ext == e for _, e, _ in group.members):
                group.fail(name, f"two members with the extension {ext}")
            if group.bad is not None:
                continue  # tarfile skips the data unread
            reading = name
            data = tf.extractfile(info).read()  # type: ignore[union-attr]  # a regular file always has one
            reading = ""
            group.members.append((name, ext, data))
            group.size += len(data)
        problem = _end_problem(end)
    except CORRUPT as err:
        problem = first_line(err)
    if problem is None:
        if group is not None:
            yield group.result(images)
        return
    member = reading or (group.members[-1][0] if group is not None and group.members else "")
    raise _Broken(BadSample(printable(group.key) if group else "", printable(member), f"truncated or corrupt tar: {problem}", fatal=True))


class _Command:
    """A `pipe:` command's process (its own process group): stdout to read, the tail of its stderr, its end."""

    def __init__(self, shard: str) -> None:
        self.shard, self.command = shard, shard[len(PIPE) :].strip()
        if not self.command:
            raise UsageError("pipe: without a command", shard)
        try:
            self.process = subprocess.Popen(
                self.command, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
            )
        except OSError as err:
            raise InputError(f"cannot start the command: {err.strerror or type(err).__name__}", shard) from None
        self.stdout = cast(IO[bytes], self.process.stdout)
        self.stderr = cast(IO[bytes], self.process.stderr)
        self.tail = b""
        self.killed = self.done = False
        self.reader = threading.Thread(target=self._keep_stderr_tail, daemon=True)
        self.reader.start()

    def _keep_stderr_tail(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            while chunk := self.stderr.read1(65536):  # type: ignore[attr-defined]
                self.tail = (self.tail + chunk)[-STDERR_TAIL:]

    def _discard_stdout(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            while self.stdout.read1(2**20):  # type: ignore[attr-defined]
                pass

    def _kill(self) -> None:
        self.killed = True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)

    def finish(self, *, drain: bool, grace_s: float) -> int | None:
        """Its exit status, None if it had to be killed: output read to its end first (drain), else grace_s to exit."""
        if not self.done:
            self.done = True
            if drain:  # the tar ended; what follows (record padding) is read so the command can exit cleanly
                discard = threading.Thread(target=self._discard_stdout, daemon=True)
                discard.start()
                discard.join(EXIT_WAIT_S)
                if discard.is_alive():
                    self._kill()
            try:
                self.process.wait(EXIT_WAIT_S if drain else grace_s)
            except subprocess.TimeoutExpired:
                self._kill()
                self.process.wait()
            self.reader.join(5.0)
            for pipe in (self.stdout, self.stderr):
                with contextlib.suppress(OSError):
                    pipe.close()
        return None if self.killed else self.process.returncode

    def failure(self, status: int) -> str:
        """`command` exited with status N: the last line of its stderr."""
        lines = [line.strip() for line in self.tail.decode("utf-8", "replace").splitlines() if line.strip()]
        how = f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"
        return f"`{self.command}` {how}: {lines[-1][:200] if lines else '(nothing on stderr)'}"


def _open_local(shard: str) -> IO[bytes]:
    path = Path(shard)
    check_utf8_name(path)
    try:
        return open(path, "rb", buffering=2**20)  # closed by iter_samples
    except FileNotFoundError:
        raise InputError("no such file", shard) from None
    except IsADirectoryError:
        raise InputError("is a directory, not a tar shard", shard) from None
    except OSError as err:
        raise InputError(f"cannot read: {err.strerror or type(err).__name__}", shard) from None


def iter_samples(
    shard: str, *, image_suffixes: Sequence[str] = IMAGE_SUFFIXES, max_member_bytes: int = MAX_MEMBER_BYTES
) -> Iterator[Sample | BadSample]:
    """The samples of one shard (a tar path, plain or compressed, or `pipe:CMD`), in order, one at a time.

    A truncated or corrupt tar ends with one BadSample. A `pipe:` command that exits non-zero ends
    with a BadSample naming it and its stderr's last line, or raises InputError if it gave no sample;
    a reader that stops early kills it. A missing local file is an InputError.
    """
    images = frozenset(s.lower().lstrip(".") for s in image_suffixes)
    command = _Command(shard) if shard.startswith(PIPE) else None
    stream = command.stdout if command is not None else _open_local(shard)
    yielded = False
    try:
        broken: BadSample | None = None
        try:
            for item in _read(stream, images, max_member_bytes):
                yielded = True
                yield item
        except _Broken as err:
            broken = err.bad
        status = command.finish(drain=broken is None, grace_s=1.0) if command is not None else None
        if status:
            if not yielded:
                raise InputError(command.failure(status), shard)  # type: ignore[union-attr]
            reason = command.failure(status)  # type: ignore[union-attr]
            broken = BadSample(broken.key if broken else "", broken.member if broken else shard,
                               f"{broken.reason}; {reason}" if broken else reason, fatal=True)
        if broken is not None:
            yield broken
    finally:
        if command is not None:
            command.finish(drain=False, grace_s=0.0)  # a reader that stopped early: kill it
        else:
            stream.close()


# ---- writing ----


class TarWriter:
    """A tar written to a hidden temp file next to `path`, published atomically by commit; deterministic headers."""

    def __init__(self, path: Path, *, overwrite: bool = False) -> None:
        self.path, self.overwrite = Path(path), overwrite
        if not overwrite and self.path.exists():
            raise OutputExistsError("already exists (use --overwrite to replace it)", self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = temp_path(self.path)
            self.file: IO[bytes] | None = open(self.tmp, "xb")  # noqa: SIM115  # closed by commit or abort
            self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8")  # noqa: SIM115
        except OSError as err:
            raise OutputError(f"cannot write: {err.strerror or type(err).__name__}", self.path) from None
        self.names: set[str] = set()

    def add(self, name: str, data: bytes) -> None:
        """Append one member (mtime 0, uid/gid 0, mode 0644, no owner names); OutputError for an unsafe or repeated name."""
        if self.file is None:
            raise ValueError("this TarWriter is closed")
        if (problem := _name_problem(name)) is not None or name in self.names:
            raise OutputError(f"refusing the member name {printable(name)!r}: {problem or 'already written'}", self.path)
        self.names.add(name)
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o644, 0, 0, "", ""
        try:
            self.tar.addfile(info, io.BytesIO(data))
        except OSError as err:
            self.abort()
            raise OutputError(f"cannot write: {err.strerror or type(err).__name__}", self.path) from None

    def commit(self) -> None:
        """Finish the tar, flush and fsync it, and publish it at `path` (OutputExistsError if it appeared meanwhile)."""
        if self.file is None:
            raise ValueError("this TarWriter is closed")
        try:
            self.tar.close()  # end-of-archive blocks
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            self.file = None
            atomic_write(self.path, lambda tmp: os.replace(self.tmp, tmp), overwrite=self.overwrite)
        except OSError as err:
            self.abort()
            if isinstance(err, OutputError):
                raise
            raise OutputError(f"cannot write: {err.strerror or type(err).__name__}", self.path) from None
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Drop the temp file; nothing is published."""
        if self.file is not None:
            with contextlib.suppress(Exception):
                self.file.close()
            self.file = None
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> TarWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        if kind is not None:
            self.abort()
        elif self.file is not None:  # not committed or aborted inside the block
            self.commit()
