"""`lmops info`: where everything lives and which versions of the stack are installed."""

from __future__ import annotations

import importlib.metadata as md
import platform

import typer

from lmcore.cli._common import JSON_OPTION, emit_json, print_table

STACK = ("torch", "prefect", "mlflow", "dvc", "great-expectations", "tokenizers", "fastapi", "pandas")


def collect_info() -> dict:
    from lmcore.settings import get_settings

    s = get_settings()
    versions = {}
    for pkg in ("lmops", *STACK):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    try:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:  # pragma: no cover - torch is a hard dependency
        device = "unknown"
    return {
        "workspace": str(s.workspace),
        "lmops_home": str(s.home),
        "params": str(s.params_path),
        "mlflow_tracking_uri": s.mlflow_tracking_uri,
        "prefect_api": s.prefect_api_url or "ephemeral (started per process)",
        "prefect_home": str(s.prefect_home),
        "dvc_remote": str(s.dvc_remote),
        "feedback_db": s.feedback_db,
        "device": device,
        "python": platform.python_version(),
        "versions": versions,
    }


def register(app: typer.Typer) -> None:
    @app.command()
    def info(as_json: bool = JSON_OPTION) -> None:
        """Show where lmops keeps everything (workspace, home, tracking, Prefect, DVC) and stack versions."""
        data = collect_info()
        if as_json:
            emit_json(data)
            return
        rows = [[k, v] for k, v in data.items() if k != "versions"]
        rows += [[f"version: {k}", v or "not installed"] for k, v in data["versions"].items()]
        print_table("lmops info", ["what", "where / value"], rows)
