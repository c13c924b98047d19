"""Shared fixtures: a CLI runner with a pinned console width, and deterministic torch."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

import pytest
import torch
from typer.testing import CliRunner

from vaetool import tiling

os.environ["COLUMNS"] = "160"  # pin Rich's console width for stable CLI output
os.environ.setdefault("TERM", "dumb")
os.environ["VAETOOL_CACHE_DIR"] = tempfile.mkdtemp(prefix="vaetool-test-cache-")  # the weights-hash cache, not ~/.cache
os.environ["VAETOOL_CPU_BF16"] = "0"  # `--dtype auto` stays fp32 on any CPU (here and in subprocesses): outputs
# compare with fp32 references; tests/test_auto_dtype.py turns native bf16 on
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def runner() -> CliRunner:
    """A typer CliRunner (stdout and stderr kept apart)."""
    return CliRunner(env={"COLUMNS": "160", "NO_COLOR": "1"})


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Add seeded noise to every parameter (breaking default inits such as norm weights all 1) and set eval."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="session")
def perturb() -> Callable[..., torch.nn.Module]:
    """`perturb(model, seed=0)`: a random model whose swapped or misnamed weights change its output."""
    return _perturb


@pytest.fixture
def ran(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, int | None]]:
    """Every runner the front door calls: (direction, mode, tile size)."""
    calls: list[tuple[str, str, int | None]] = []
    for key, real in list(tiling.RUNNERS.items()):
        def spy(m, x, size, ov, t, key=key, real=real):
            calls.append((*key, size))
            return real(m, x, size, ov, t)

        monkeypatch.setitem(tiling.RUNNERS, key, spy)
    return calls
