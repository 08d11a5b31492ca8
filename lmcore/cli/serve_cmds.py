"""Verbs for this module are added by the issue that owns it."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    return None
