"""The `vaetool` command line: one small module per command, one error map at this edge."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import typer
from rich.markup import escape

from vaetool.cli import app_state
from vaetool.errors import VaeToolError

app = typer.Typer(
    name="vaetool",
    help="Images to latents and latents to images with the Stable Diffusion family of VAEs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _message(err: BaseException) -> str:
    """One line for an error the user can act on (the exception-to-message map)."""
    for kind, render in ERROR_MESSAGES:
        if isinstance(err, kind):
            return render(err)
    return f"internal error: {type(err).__name__}: {err} (run with --debug for the traceback)"


ERROR_MESSAGES: list[tuple[type[BaseException], Callable[[Any], str]]] = [
    (VaeToolError, str),
    (FileNotFoundError, lambda e: f"{e.filename}: no such file"),
    (PermissionError, lambda e: f"{e.filename}: permission denied"),
    (MemoryError, lambda e: "out of memory; try --tile or a smaller --max-memory / --batch-size"),
    (KeyboardInterrupt, lambda e: "interrupted"),
]


def run_command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a command so user errors print one line on stderr and exit 1 (tracebacks with --debug)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        app_state.debug = app_state.debug or bool(kwargs.get("debug"))
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except (Exception, KeyboardInterrupt) as err:  # the one place errors become messages
            if app_state.debug:
                raise
            app_state.err_console.print(f"[red]error:[/red] {escape(_message(err))}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(130 if isinstance(err, KeyboardInterrupt) else 1) from None

    return wrapper


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
) -> None:
    """vaetool: encode, decode, roundtrip and inspect VAE models and latents."""
    app_state.debug = debug


def _register() -> None:
    from vaetool.cli import decode, encode, info, roundtrip, train, video

    for module in (info, train, encode, decode, video, roundtrip):
        app.command(module.NAME, help=module.HELP)(run_command(module.command))


_register()


def main() -> None:
    """Console-script entry point."""
    app(prog_name="vaetool")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
