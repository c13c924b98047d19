"""Input lists: files, folders (top level or recursive), globs and --files-from lists -> InputFiles.

Each InputFile keeps `rel`, its path relative to the folder (or glob base) it was found under, so
outputs can mirror the input tree under -o; `rel` is never absolute and never holds `..` (a glob
like `in/*/../../x.png` mirrors only the name), so no output lands outside -o. The result is sorted
by rel, deduplicated by real path; inputs that share a stem (cat.png, cat.jpg) keep their suffix in
their output names (cat.png.safetensors), and two inputs that would still share an output are
refused. Globs follow glob.glob's rules (`*` skips hidden names, `**` spans folders and follows
links to folders) except that `**` enters each folder once, so a symlink loop cannot hang the walk.
"""

from __future__ import annotations

import fnmatch
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePath
from typing import TextIO

from vaetool.errors import InputError, UsageError
from vaetool.io.images import IMAGE_SUFFIXES

__all__ = ["InputFile", "collect_inputs", "output_path", "read_list"]

GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class InputFile:
    """An input file and its path relative to where it was found (used to mirror the tree)."""

    path: Path
    rel: PurePath
    keep_suffix: bool = False  # its stem is shared with another input (cat.png, cat.jpg): outputs keep the suffix

    def __post_init__(self) -> None:
        if self.rel.is_absolute() or ".." in self.rel.parts or not self.rel.parts:
            raise InputError(f"cannot mirror {self.rel} under the output folder (absolute, empty or with ..)", self.path)

    @property
    def out_stem(self) -> PurePath:
        """rel without its suffix (cat), or with it when another input shares the stem (cat.png)."""
        return self.rel if self.keep_suffix else self.rel.with_suffix("")

    def output_rel(self, suffix: str) -> PurePath:
        """The output's path relative to the output folder: cat.safetensors, or cat.png.safetensors on a stem collision."""
        return self.out_stem.with_name(self.out_stem.name + suffix)


def _visible(rel: PurePath) -> bool:
    """Hidden files and folders (dot names: editor files, our own temp files) are skipped."""
    return not any(part.startswith(".") for part in rel.parts)


def _wanted(path: Path, suffixes: Sequence[str]) -> bool:
    return path.name.lower().endswith(tuple(suffixes)) and path.is_file()  # endswith: suffixes of two parts (.pt.gz)


def _from_dir(directory: Path, recursive: bool, suffixes: Sequence[str]) -> Iterator[InputFile]:
    found = directory.rglob("*") if recursive else directory.iterdir()
    for path in found:
        rel = path.relative_to(directory)
        if _visible(rel) and _wanted(path, suffixes):
            yield InputFile(path, PurePath(rel))


def _glob_base(pattern: str) -> Path:
    """The folder part of a glob before its first wildcard ("data/**/*.png" -> data)."""
    parts = PurePath(pattern).parts
    first = next(i for i, p in enumerate(parts) if GLOB_CHARS & set(p))
    return Path(*parts[:first]) if first else Path(".")


def _names(directory: str) -> list[str]:
    """The entries of a folder, sorted ([] when it cannot be listed, as glob.glob does)."""
    try:
        return sorted(os.listdir(directory or os.curdir))
    except OSError:
        return []


def _dirs_once(directory: str) -> Iterator[str]:
    """`directory` and every visible folder below it, following links, each real folder once."""
    seen: set[tuple[int, int]] = set()
    stack = [directory]
    while stack:
        current = stack.pop()
        try:
            st = os.stat(current or os.curdir)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:  # a link back up the tree, or a second way to one folder
            continue
        seen.add((st.st_dev, st.st_ino))
        yield current
        subdirs = [os.path.join(current, n) for n in _names(current) if not n.startswith(".")]
        stack += reversed([d for d in subdirs if os.path.isdir(d)])


def _glob_walk(directory: str, parts: Sequence[str]) -> Iterator[str]:
    """Paths below `directory` that match the pattern parts (`**` = any number of folders)."""
    if not parts:
        yield directory
        return
    head, rest = parts[0], parts[1:]
    if head == "**":
        for sub in _dirs_once(directory):
            if rest:
                yield from _glob_walk(sub, rest)
            else:  # a trailing ** matches every visible entry below
                yield from (os.path.join(sub, n) for n in _names(sub) if not n.startswith("."))
    elif GLOB_CHARS & set(head):
        for name in _names(directory):
            if (head.startswith(".") or not name.startswith(".")) and fnmatch.fnmatch(name, head):
                yield from _glob_walk(os.path.join(directory, name), rest)
    elif rest or os.path.lexists(os.path.join(directory, head)):
        yield from _glob_walk(os.path.join(directory, head), rest)


def _relative(path: str, base: Path) -> PurePath:
    """`path` relative to `base` with `.` and `..` resolved by name; just the file name when it lies outside base."""
    rel = PurePath(os.path.relpath(os.path.normpath(path), os.path.normpath(base)))
    return PurePath(PurePath(path).name) if ".." in rel.parts or rel.is_absolute() else rel


def _from_glob(pattern: str, suffixes: Sequence[str]) -> Iterator[InputFile]:
    base = _glob_base(pattern)
    parts = PurePath(pattern).parts[len(base.parts) if base != Path(".") else 0 :]
    start = str(base) if base != Path(".") else ""
    for match in _glob_walk(start, parts):
        path = Path(match)
        if _wanted(path, suffixes):
            yield InputFile(path, _relative(match, base))


def _from_arg(arg: str, recursive: bool, suffixes: Sequence[str], *, from_list: bool = False) -> list[InputFile]:
    """One argument (or, with from_list, one --files-from entry: never a glob) -> its InputFiles."""
    path = Path(arg)
    if path.is_dir():
        found = list(_from_dir(path, recursive, suffixes))
        if not found and not recursive and (deeper := next(_from_dir(path, True, suffixes), None)) is not None:
            raise UsageError(f"no {_kinds(suffixes)} files directly in this folder, but some in its subfolders "
                             f"({deeper.rel.as_posix()}, ...): add -r/--recursive to take them", arg)
        return found
    if path.is_file():  # named explicitly: taken whatever its suffix
        keep_tree = from_list and not path.is_absolute() and ".." not in path.parts
        return [InputFile(path, PurePath(path) if keep_tree else PurePath(path.name))]
    if not from_list and GLOB_CHARS & set(arg):
        found = list(_from_glob(arg, suffixes))
        if not found:
            raise InputError(f"no {_kinds(suffixes)} files match this pattern", arg)
        return found
    raise InputError("no such file or directory", arg)


def _kinds(suffixes: Sequence[str]) -> str:
    """'png/jpg/...' for a message."""
    return "/".join(s.lstrip(".") for s in suffixes)


def read_list(lines: Iterable[str]) -> list[str]:
    """Paths from a list, one per line; blank lines and # comments skipped."""
    entries = (line.rstrip("\r\n").strip() for line in lines)
    return [e for e in entries if e and not e.startswith("#")]


def _read_files_from(source: str, stdin: TextIO) -> list[str]:
    if source == "-":
        return read_list(stdin)
    try:
        with open(source, encoding="utf-8") as f:
            return read_list(f)
    except FileNotFoundError:
        raise InputError("no such file (--files-from)", source) from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read the list: {getattr(err, 'strerror', None) or err}", source) from None


def collect_inputs(
    paths: Sequence[str],
    *,
    recursive: bool = False,
    files_from: str | None = None,
    suffixes: Sequence[str] = IMAGE_SUFFIXES,
    stdin: TextIO | None = None,
) -> list[InputFile]:
    """Expand files, folders, globs and a --files-from list (`-` = stdin) into sorted, unique InputFiles.

    Entries of a list are plain paths (no globbing; folders are expanded); a relative file entry
    keeps its relative path as `rel`. A path that does not exist is an InputError naming it.
    """
    suffixes = tuple(s.lower() for s in suffixes)
    found: list[InputFile] = []
    for arg in paths:
        found += _from_arg(arg, recursive, suffixes)
    if files_from is not None:
        for entry in _read_files_from(files_from, stdin or sys.stdin):
            found += _from_arg(entry, recursive, suffixes, from_list=True)
    unique: dict[str, InputFile] = {}
    for item in sorted(found, key=lambda f: (f.rel.as_posix(), str(f.path))):
        unique.setdefault(os.path.realpath(item.path), item)
    result = sorted(unique.values(), key=lambda f: (f.rel.as_posix(), str(f.path)))
    return _check_collisions(_keep_shared_suffixes(result))


def _keep_shared_suffixes(items: Sequence[InputFile]) -> list[InputFile]:
    """Inputs whose stems collide (cat.png, cat.jpg) keep their suffix in their output names (cat.png.safetensors,
    cat.jpg.safetensors), whatever their order; the others keep plain names (dog.safetensors)."""
    stems: dict[str, int] = {}
    for item in items:
        stems[item.rel.with_suffix("").as_posix()] = stems.get(item.rel.with_suffix("").as_posix(), 0) + 1
    return [replace(item, keep_suffix=True) if stems[item.rel.with_suffix("").as_posix()] > 1 and item.rel.suffix else item
            for item in items]


def _check_collisions(items: list[InputFile]) -> list[InputFile]:
    """Refuse two inputs whose outputs would still be the same file (a/x.png and b/x.png named one by one)."""
    seen: dict[str, InputFile] = {}
    for item in items:
        key = item.out_stem.as_posix()
        if key in seen:
            other = seen[key]
            raise InputError(f"{other.path} and {item.path} would be written to the same output "
                             f"({item.out_stem}.*); pass their folder instead, or rename one", item.path)
        seen[key] = item
    return items


def output_path(item: InputFile, out_dir: str | Path, suffix: str) -> Path:
    """Where the output of `item` goes: out_dir / rel with the new suffix (the input tree mirrored), always inside out_dir."""
    out = Path(out_dir) / item.output_rel(suffix)
    inside = os.path.relpath(os.path.normpath(out), os.path.normpath(out_dir))
    if inside.startswith(os.pardir) or os.path.isabs(inside):  # unreachable while rel holds no `..`; kept as a guard
        raise InputError(f"its output {out} would lie outside {out_dir}", item.path)
    return out
