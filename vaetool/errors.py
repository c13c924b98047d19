"""User-facing errors: each one is a single line that names the file and the problem."""

from __future__ import annotations

from pathlib import Path


def printable(path: str | Path) -> str:
    """A path as text that can be printed and stored: bytes of a name that are not UTF-8 become \\xff escapes."""
    text = str(path)
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # surrogates that did not come from a file name
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


class VaeToolError(Exception):
    """An error caused by the user's input, shown as one line without a traceback."""

    def __init__(self, problem: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else printable(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class UsageError(VaeToolError):
    """A command used wrongly: a missing or contradictory option or argument (exit code 2)."""


class ConfigError(VaeToolError):
    """A YAML config that cannot be read or instantiated."""


class CheckpointError(VaeToolError):
    """A checkpoint file that cannot be read, is unsafe, or does not fit the model."""


class InputError(VaeToolError):
    """An image, latent or other input file that cannot be used."""


class OutputError(VaeToolError):
    """An output file or directory that cannot be written."""


class OutputExistsError(OutputError, FileExistsError):
    """An output that already exists and may not be overwritten."""


class StaleOutputError(UsageError):
    """Existing outputs that another run wrote with other settings (exit code 2: rerun with --overwrite)."""


class MemoryBudgetError(VaeToolError):
    """A memory budget too small for even the smallest tile of the operation."""


def check_utf8_name(path: str | Path, error: type[VaeToolError] = InputError) -> None:
    """`error` naming the file when its path is not valid UTF-8 (names are recorded as text in outputs)."""
    if printable(path) != str(path):
        raise error("its name is not valid UTF-8; rename it (vaetool records file names as text)", path)


def first_line(err: BaseException, limit: int = 160) -> str:
    """The first sentence of an exception's message on one line, with its type when the text says little."""
    text = next((line.strip() for line in str(err).splitlines() if line.strip()), "").split(". ")[0]
    return (text if len(text) > 12 else f"{type(err).__name__} {text}".strip())[:limit]
