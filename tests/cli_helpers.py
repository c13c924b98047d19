"""Helpers shared by the CLI tests: noise images on disk, and the environment of a `python -m vaetool` subprocess."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def noise_png(path: Path, w: int, h: int, seed: int = 0) -> Path:
    """A w x h RGB image of seeded uniform noise, written to `path` (folders made)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def subprocess_env() -> dict[str, str]:
    """This environment for a child `python -m vaetool`: one thread, this checkout first, not under torchrun."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return env


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run in-process work with one thread, as subprocess_env's children do: same threads and batch, same latent bytes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
