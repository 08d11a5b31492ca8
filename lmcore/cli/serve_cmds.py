"""`lmops serve`: the model server (API + playground) for the registry champion or a model folder.

Harvesting feedback into training data is a library call (:func:`harvest`), wrapped by the
orchestration verb `lmops harvest` in ``flows.cli``.
"""

from __future__ import annotations

import os

import typer

from lmcore.cli._common import PARAMS_OPTION, SET_OPTION, load_params_cli
from lmcore.config import load_params
from lmcore.settings import get_settings


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve_cmd(
        host: str = typer.Option(
            None, "--host", help="Interface to bind (default: serve.host, 127.0.0.1); beyond loopback it needs "
                                 "LMOPS_API_TOKEN."),
        port: int = typer.Option(None, "--port", help="Port (default: serve.port, 8000)."),
        model: str = typer.Option(
            None, "--model", "-m",
            help="models:/<name>@<alias> or a model folder (default: models:/<registry.model_name>@<serve.alias>).",
        ),
        params: str = PARAMS_OPTION,
        sets: list[str] = SET_OPTION,
    ) -> None:
        """Serve the model: POST /v1/generate, POST /v1/feedback, /health, /metrics, the playground at /."""
        from lmcore.serve.limits import require_token_beyond_loopback  # lazy: keeps `lmops --help` fast

        p = load_params_cli(params, sets)
        source = model or f"models:/{p.registry.model_name}@{p.serve.alias}"
        host = host or p.serve.host
        port = port or p.serve.port
        require_token_beyond_loopback(host, os.environ.get("LMOPS_API_TOKEN"))  # at once, before the app loads

        from lmcore.serve.app import serve  # lazy: keeps `lmops --help` fast
        typer.echo(f"serving {source} on http://{host}:{port}  (playground: /, API docs: /docs)")
        serve(source, p, get_settings().ensure(), host=host, port=port)


def harvest(settings=None, params=None, **kw):
    """Library entry for `lmops harvest` (see :func:`lmcore.feedback.harvest.harvest`)."""
    from lmcore.feedback.harvest import harvest as _harvest  # lazy: keeps `lmops --help` fast

    return _harvest(settings or get_settings(), params or load_params(), **kw)
