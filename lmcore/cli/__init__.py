"""The `lmops` command: one verb per user task, each a thin layer over one lmcore module.

Each verb group lives in its own module with a ``register(app)`` function; heavy imports
(torch, mlflow, dvc, great_expectations) happen inside the verbs so ``--help`` stays fast.
Verbs that run or start Prefect (`run`, `schedule`, `harvest`, `ui`) are added by ``flows.cli``
(the `lmops` console script): lmcore never imports flows.
"""

from __future__ import annotations

import os
import sys

import typer

from lmcore.errors import LmopsError
from lmcore.settings import apply_environment

app = typer.Typer(
    name="lmops",
    help="lmops: raw text -> validated, versioned data -> trained, tracked, served language model -> feedback.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show library logs (Prefect, MLflow, DVC)."),
) -> None:
    """lmops: one loop from raw text to a served model and back."""
    if verbose:
        os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "INFO"
        os.environ["MLFLOW_LOGGING_LEVEL"] = "INFO"
        os.environ["LMOPS_VERBOSE"] = "1"


def _register_all() -> None:
    # lazy: keeps `lmops --help` fast
    from lmcore.cli import data_cmds, info_cmds, optimize_cmds, registry_cmds, serve_cmds, train_cmds

    for module in (info_cmds, train_cmds, data_cmds, registry_cmds, serve_cmds, optimize_cmds):
        module.register(app)


_register_all()


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit code 1, never a traceback."""
    apply_environment()
    try:
        app(args=argv)
    except LmopsError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(1)
