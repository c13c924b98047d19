"""Shard specs as WebDataset writes them: braces expanded like braceexpand, and which arguments name tar shards.

`data-{0000..0099}.tar` is 100 shards (zero padding kept from the first bound), `{a,b}` a list,
several braces their product in order (the leftmost slowest), nested braces work, and `\\{`, `\\}`,
`\\,` are literal characters. `pipe:CMD` specs are expanded too (`pipe:curl -s http://x/d-{0..9}.tar`
is ten commands). Unbalanced braces, a reversed range, a group that is neither a range nor a list, or
more than a million shards are UsageErrors naming the spec.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from vaetool.errors import UsageError

__all__ = ["PIPE", "TAR_SUFFIXES", "expand_shards", "is_shard_spec"]

PIPE = "pipe:"
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
MAX_SHARDS = 1_000_000  # brace expansion results
ESCAPABLE = "{},"  # `\{` `\}` `\,` are literal characters in a spec


class _Range(NamedTuple):
    lo: int
    hi: int
    width: int  # zero padding, from the first bound


_Part = Any  # str (literal), _Range, or list[list[_Part]] (alternatives)
_RANGE = re.compile(r"(\d+)\.\.(\d+)")


def _parse(spec: str, i: int, depth: int) -> tuple[list[_Part], int]:
    """Parts of `spec` from i up to the end, or (inside braces) up to a `,` or `}` at this depth."""
    parts: list[_Part] = []
    text: list[str] = []
    while i < len(spec):
        ch = spec[i]
        if ch == "\\" and i + 1 < len(spec) and spec[i + 1] in ESCAPABLE:
            text.append(spec[i + 1])
            i += 2
            continue
        if ch == "}" and not depth:
            raise UsageError("unbalanced braces: a '}' without its '{'", spec)
        if depth and ch in ",}":
            break
        if ch == "{":
            parts.append("".join(text))
            text = []
            group, i = _parse_group(spec, i + 1, depth + 1)
            parts.append(group)
            continue
        text.append(ch)
        i += 1
    parts.append("".join(text))
    return parts, i


def _parse_group(spec: str, i: int, depth: int) -> tuple[_Part, int]:
    """The brace group opened just before i: a range or a list of alternatives, and the index after its `}`."""
    start, alternatives = i, []
    while True:
        parts, i = _parse(spec, i, depth)
        alternatives.append(parts)
        if i >= len(spec):
            raise UsageError("unbalanced braces: a '{' without its '}'", spec)
        i += 1
        if spec[i - 1] == "}":
            break
    if len(alternatives) > 1:
        return alternatives, i
    raw = spec[start : i - 1]
    m = _RANGE.fullmatch(raw)
    if m is None:
        raise UsageError(f"{{{raw}}} is neither a range like {{000..099}} nor a list like {{a,b}}", spec)
    lo, hi = int(m[1]), int(m[2])
    if lo > hi:
        raise UsageError(f"reversed range {{{raw}}}", spec)
    return _Range(lo, hi, len(m[1])), i


def _count(parts: list[_Part]) -> int:
    """How many strings the parts expand to (stops growing past MAX_SHARDS)."""
    n = 1
    for part in parts:
        if isinstance(part, _Range):
            n *= part.hi - part.lo + 1
        elif isinstance(part, list):
            n *= sum(_count(alternative) for alternative in part)
        if n > MAX_SHARDS:
            break
    return n


def _expand(parts: list[_Part]) -> list[str]:
    out = [""]
    for part in parts:
        if isinstance(part, str):
            options = [part]
        elif isinstance(part, _Range):
            options = [str(k).zfill(part.width) for k in range(part.lo, part.hi + 1)]
        else:
            options = [s for alternative in part for s in _expand(alternative)]
        out = [a + b for a in out for b in options]  # cartesian, the leftmost brace slowest
    return out


def expand_shards(spec: str) -> list[str]:
    """A shard spec's shards, braces expanded like braceexpand (`{0000..0099}`, `{a,b}`, several, nested), pipe: too."""
    parts, _ = _parse(spec, 0, 0)
    if (n := _count(parts)) > MAX_SHARDS:
        raise UsageError(f"its braces expand to more than {MAX_SHARDS} shards ({n} or more)", spec)
    return _expand(parts)


def is_shard_spec(arg: str) -> bool:
    """Whether a command-line argument names tar shards (pipe:, or a path ending .tar/.tar.gz/... after braces)."""
    if arg.startswith(PIPE) or arg.lower().endswith(TAR_SUFFIXES):
        return True
    if "{" not in arg:
        return False
    try:
        return all(name.lower().endswith(TAR_SUFFIXES) for name in expand_shards(arg))
    except UsageError:
        return False
