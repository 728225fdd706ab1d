"""What every `llmpipe` command shares: the typer app they register on, the consoles, the exit codes and
the one way to fail. Its own module so that the command modules (flows/cli_pipeline.py, cli_inspect.py,
cli_model.py) and flows/cli.py, which imports them, share one app also when `python -m flows.cli` runs
the CLI as __main__."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console

from flows.env import configure_environment
from tasks.core.layout import project_root
from tasks.core.params import ParamsError
from tasks.core.stages import INPUT_ERROR_EXIT

app = typer.Typer(
    help="llmpipe: raw text corpus → trained, evaluated small GPT (Prefect + DVC + MLflow).",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()
errors = Console(stderr=True)

#: Exit codes besides INPUT_ERROR_EXIT (bad params or input: the flow and torchrun do not retry it).
FAILED_EXIT = 1
USAGE_ERROR_EXIT = 2  # a bad command line, or not inside a project

#: Failures caused by the user's input or params (they exit with INPUT_ERROR_EXIT).
INPUT_ERRORS = (ParamsError, FileNotFoundError, ValueError, UnicodeError, PermissionError)


def fail(problem: object, code: int = INPUT_ERROR_EXIT, label: str = "error") -> NoReturn:
    """Print `label: problem` to stderr and exit with `code` (no traceback: the message says it all)."""
    errors.print(f"[red]{label}:[/red] {problem}")
    raise typer.Exit(code) from None


def project() -> Path:
    """The project root (exit 2 outside one), with the environment pointed into it (MLflow, Prefect)."""
    try:
        root = project_root()
    except FileNotFoundError as err:
        fail(err, USAGE_ERROR_EXIT)
    configure_environment(root)
    return root
