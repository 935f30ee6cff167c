"""The typer application, its console, and ``main``: user errors become one ``error:`` line and exit code 2."""

import sys
import warnings

import typer
from rich.console import Console

from qrobust.errors import QRobustError

app = typer.Typer(
    help="Small, fast and provably robust neural networks: train, certify and analyze.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()


def main() -> None:
    """Entry point of the ``qrobust`` console script."""
    with warnings.catch_warnings():  # the library's warnings as one line each, not Python's file:line form
        warnings.showwarning = _warn
        warnings.simplefilter(
            "ignore", DeprecationWarning
        )  # torch's notices to developers, hidden as Python does by default
        try:
            code = app(standalone_mode=False)
        except typer.TyperException as error:  # usage errors: unknown option, bad type, missing argument
            _fail(error.format_message(), getattr(error, "exit_code", 2))
        except (QRobustError, ValueError, OSError) as error:
            _fail(str(error), 2)
        except (KeyboardInterrupt, typer.Abort):
            _fail("interrupted", 130)
    sys.exit(code if isinstance(code, int) else 0)


def _warn(message, category, filename, lineno, file=None, line=None) -> None:  # the warnings.showwarning signature
    Console(stderr=True).print(f"[bold yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


def _fail(message: str, code: int) -> None:
    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    sys.exit(code)
