"""Output helpers shared by every verb: `--json` for scripts, rich tables for people."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from lmcore.config import load_params, parse_override

JSON_OPTION = typer.Option(False, "--json", help="Print one JSON object instead of a human summary.")
PARAMS_OPTION = typer.Option(None, "--params", help="params.yaml to read (default: the workspace's).")
SET_OPTION = typer.Option(None, "--set", "-S", help="Override a param, e.g. -S train.lr=1e-3 (repeatable).")
WIDE_OPTION = typer.Option(False, "--wide", "-w", help="Show every column, in full (lines may pass the terminal's "
                                                       "width; --json has every value too).")


def emit_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=None, sort_keys=False, default=str))


def load_params_cli(params_path: str | None, sets: list[str] | None):
    overrides = dict(parse_override(s) for s in (sets or []))
    return load_params(params_path, overrides)


def print_table(title: str, columns: list[str], rows: list[list[Any]], *,
                default_columns: Sequence[str] | None = None, wide: bool = False) -> None:
    """A rich table on stdout. ``default_columns`` (a subset of ``columns``) are the ones shown
    unless ``wide``: few enough to read whole on an 80-column terminal. With ``wide`` every column
    is shown and the table keeps its natural width, even past the terminal's. A value never ends
    in an ellipsis: one too long for its column folds onto the next line."""
    keep = list(range(len(columns)))
    if default_columns is not None and not wide:
        keep = [i for i, c in enumerate(columns) if c in default_columns]
    table = Table(title=title)
    for i in keep:
        table.add_column(columns[i], overflow="fold")
    for r in rows:
        table.add_row(*("" if r[i] is None else str(r[i]) for i in keep))
    console = Console()
    if wide:  # as wide as the table wants (measured without the terminal's limit)
        natural = console.measure(table, options=console.options.update_width(1_000_000)).maximum
        console = Console(width=max(console.width, natural))
    console.print(table)
