"""Output helpers shared by every verb: `--json` for scripts, rich tables for people."""

from __future__ import annotations

import json
from typing import Any

import typer

JSON_OPTION = typer.Option(False, "--json", help="Print one JSON object instead of a human summary.")
PARAMS_OPTION = typer.Option(None, "--params", help="params.yaml to read (default: the workspace's).")
SET_OPTION = typer.Option(None, "--set", "-S", help="Override a param, e.g. -S train.lr=1e-3 (repeatable).")


def emit_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=None, sort_keys=False, default=str))


def load_params_cli(params_path: str | None, sets: list[str] | None):
    from lmcore.config import load_params, parse_override

    overrides = dict(parse_override(s) for s in (sets or []))
    return load_params(params_path, overrides)


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*("" if v is None else str(v) for v in r))
    Console().print(table)
