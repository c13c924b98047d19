"""Rename a state dict's keys through a rule table; every key must match a rule, no two may collide.

A rule is (regex, target): the regex must match the whole key; the target is a template filled
from the regex's named groups, or a function of the match for computed names.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch

from vaetool.errors import CheckpointError

Target = str | Callable[[re.Match[str]], str]
Rule = tuple[str, Target]

LEAF = r"(?P<leaf>weight|bias)"


def alternatives(names: Sequence[str]) -> str:
    """A regex group body matching any of `names` literally."""
    return "|".join(re.escape(n) for n in names)


def compile_rules(rules: Sequence[Rule]) -> list[tuple[re.Pattern[str], Target]]:
    """Compile each rule's regex once."""
    return [(re.compile(pattern), target) for pattern, target in rules]


def _target(target: Target, m: re.Match[str]) -> str:
    return target(m) if callable(target) else target.format(**{k: v for k, v in m.groupdict().items() if v is not None})


def rename(sd: dict[str, torch.Tensor], rules: Sequence[tuple[re.Pattern[str], Target]], what: str) -> dict[str, torch.Tensor]:
    """Every key renamed by the first rule whose regex matches all of it; unmapped or colliding keys are an error."""
    out: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for key, value in sd.items():
        m, target = next(((m, t) for p, t in rules if (m := p.fullmatch(key))), (None, None))
        if m is None or target is None:
            unmapped.append(key)
            continue
        new = _target(target, m)
        if new in out:
            raise CheckpointError(f"two {what} keys map to {new}")
        out[new] = value
    if unmapped:
        listing = ", ".join(sorted(unmapped)[:5])
        raise CheckpointError(f"{len(unmapped)} {what} key(s) have no original-layout equivalent: {listing}")
    return out


def layout_from_markers(sd: dict[str, torch.Tensor], markers: dict[str, re.Pattern[str]], what: str) -> str:
    """The one layout whose marker pattern some key matches; an error when none or several do."""
    found = sorted({layout for layout, pat in markers.items() for k in sd if pat.search(k)})
    if len(found) != 1:
        how = f"both {' and '.join(found)} key names" if found else f"no recognisable {what} key names"
        raise CheckpointError(f"cannot tell the {what} key layout: it has {how} (e.g. {', '.join(sorted(sd)[:4])})")
    return found[0]
