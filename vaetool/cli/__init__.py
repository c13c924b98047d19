"""The `vaetool` command line: one small module per command over vaetool.jobs; the app lives in cli.root.

Importing a command module registers nothing; `vaetool.cli.root` builds the app with every command.
"""

from __future__ import annotations

import sys
from typing import Any


def main() -> None:
    """Console-script entry point (`vaetool --version` alone answers before Typer and Rich are imported)."""
    if sys.argv[1:] == ["--version"]:
        from vaetool import __version__

        print(f"vaetool {__version__}")  # what the Typer option prints
        return
    from vaetool.cli.root import app

    app(prog_name="vaetool")


def __getattr__(name: str) -> Any:
    """`from vaetool.cli import app` builds the app on first use."""
    if name == "app":
        from vaetool.cli.root import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
