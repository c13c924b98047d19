"""Process-wide CLI settings: the --debug flag and the consoles (data on stdout, messages on stderr)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

Debug = Annotated[bool, typer.Option("--debug", help="Show the full traceback of an error.")]

debug: bool = False
console = Console()
err_console = Console(stderr=True)
