"""The `vaetool` Typer app: every command registered, and the one exception-to-message map at this edge."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import typer
from rich.markup import escape
from typer.core import TyperGroup

from vaetool.cli import common, decode, encode, info, roundtrip, train, video
from vaetool.errors import CheckpointError, ConfigError, StaleOutputError, UsageError, VaeToolError

USAGE = 2  # exit code of a usage error: a bad option, config, model name or checkpoint
FAILED = 1  # exit code of a failed input or output
# Click's UsageError, the base of typer.BadParameter (typer bundles its own copy of Click)
CLICK_USAGE_ERROR: type[Exception] = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


class _OneLineUsageErrors(TyperGroup):
    """The app's group: Click's usage errors (a bad option value, a missing argument, an unknown option) are one
    line on stderr and exit 2, like vaetool's own usage errors, rather than a usage block and a boxed message."""

    def make_context(self, info_name: str | None, args: list[str], parent: typer.Context | None = None, **extra: Any) -> typer.Context:
        with _one_line(info_name or "vaetool"):
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: typer.Context) -> Any:
        with _one_line(ctx.command_path):
            return super().invoke(ctx)


@contextlib.contextmanager
def _one_line(where: str) -> Iterator[None]:
    try:
        yield
    except CLICK_USAGE_ERROR as err:
        if type(err).__name__ == "NoArgsIsHelpError":  # `vaetool` alone: typer shows the help
            raise
        ctx = getattr(err, "ctx", None)
        path = ctx.command_path if ctx is not None else where
        common.say(f"error: {err.format_message().rstrip('.')} (see {path} --help)")  # type: ignore[attr-defined]
        raise typer.Exit(USAGE) from None


app = typer.Typer(
    cls=_OneLineUsageErrors,
    name="vaetool",
    help="Images to latents and latents to images with the VAEs of latent-diffusion models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# exception type -> (exit code, one-line message); the first match wins
ERROR_MESSAGES: list[tuple[type[BaseException], int, Callable[[Any], str]]] = [
    (StaleOutputError, USAGE, str),  # outputs of other settings: named with the field that differs, before any work
    (UsageError, USAGE, str),
    (ConfigError, USAGE, str),
    (CheckpointError, USAGE, str),
    (VaeToolError, FAILED, str),
    (FileNotFoundError, FAILED, lambda e: f"{e.filename}: no such file"),
    (PermissionError, FAILED, lambda e: f"{e.filename}: permission denied"),
    (MemoryError, FAILED, lambda e: "out of memory; try --tile or a smaller --max-memory / --batch-size"),
    (KeyboardInterrupt, 130, lambda e: "interrupted"),
]


def exit_and_message(err: BaseException) -> tuple[int, str]:
    """The exit code and the one line to show for an error (anything unmapped is an internal error)."""
    for kind, code, render in ERROR_MESSAGES:
        if isinstance(err, kind):
            return code, render(err)
    return FAILED, f"internal error: {type(err).__name__}: {err} (run with --debug for the traceback)"


def run_command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a command so errors print one line on stderr and exit with their code (tracebacks with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        common.state["debug"] = common.state["debug"] or bool(kwargs.get("debug"))
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except (Exception, KeyboardInterrupt) as err:  # the one place errors become messages
            if common.state["debug"]:
                raise
            code, message = exit_and_message(err)
            common.err_console.print(f"[red]error:[/red] {escape(message)}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(code) from None

    return wrapper


def _version(value: bool) -> None:
    """Typer callback of --version: print `vaetool X.Y.Z` and stop."""
    if value:
        from vaetool import __version__

        typer.echo(f"vaetool {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", callback=_version, is_eager=True),
) -> None:
    """vaetool: encode, decode, roundtrip and inspect VAE models and latents."""
    common.state["debug"] = debug


for _module in (info, train, encode, decode, video, roundtrip):
    app.command(_module.NAME, help=_module.HELP)(run_command(_module.command))
