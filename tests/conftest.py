"""Shared fixtures: a CLI runner with a pinned console width, and deterministic torch."""

from __future__ import annotations

import os

import pytest
import torch
from typer.testing import CliRunner

os.environ["COLUMNS"] = "160"  # pin Rich's console width for stable CLI output
os.environ.setdefault("TERM", "dumb")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def runner() -> CliRunner:
    """A typer CliRunner (stdout and stderr kept apart)."""
    return CliRunner(env={"COLUMNS": "160", "NO_COLOR": "1"})


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
