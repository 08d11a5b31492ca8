"""The FastAPI app: generate (plain or SSE), feedback, health, metrics, admin reload, the playground.

``create_app`` composes the parts: a :class:`~lmcore.serve.state.ServeState` (engine, feedback
store, limits, metrics registry, token) built once per app, so tests and benchmarks can run
several apps side by side; the error handlers (:mod:`lmcore.serve.errors`); the routers
(:mod:`lmcore.serve.routes`); the OpenAPI schema (:mod:`lmcore.serve.openapi`). The model loads
in a background thread at startup: ``/health`` answers 503 until it is ready.
"""

from __future__ import annotations

import logging
import os
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI

from lmcore.config import Params
from lmcore.serve.errors import install_error_handlers
from lmcore.serve.limits import require_token_beyond_loopback
from lmcore.serve.metrics import MetricsMiddleware
from lmcore.serve.openapi import install_openapi
from lmcore.serve.routes import ROUTERS
from lmcore.serve.state import ServeState
from lmcore.serve.transport import ClientLimits, timed_h11

log = logging.getLogger("lmops.serve")


def create_app(source: str, params=None, settings=None, *, store=None, api_token: str | None = None) -> FastAPI:
    """An app serving ``source`` (``models:/<name>@<alias>`` or a model folder).

    ``api_token`` defaults to ``$LMOPS_API_TOKEN``; when set it guards feedback and admin endpoints.
    ``store`` (a FeedbackStore) is used as given and left open; without one the app opens
    ``settings.feedback_db`` at startup and closes it at shutdown.
    """
    state = ServeState.build(source, params, settings, store=store, api_token=api_token)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        state.start()
        try:
            yield
        finally:
            state.stop()

    app = FastAPI(
        title="lmops model server",
        version="1",
        summary="Generate text with the champion model, send feedback, watch health and metrics.",
        lifespan=lifespan,
    )
    app.state.lmops = state
    sp_cfg = state.serve_cfg
    app.add_middleware(ClientLimits, max_body_bytes=sp_cfg.max_body_bytes, body_timeout_s=sp_cfg.body_timeout_s,
                       send_timeout_s=sp_cfg.send_timeout_s)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)  # outermost: counts the 408/413s too
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    install_openapi(app)
    return app


def uvicorn_config(app: FastAPI, params: Params, host: str, port: int) -> uvicorn.Config:
    """uvicorn with the slow-client timeouts of ``params.serve`` (request head, keep-alive)."""
    sp_cfg = params.serve
    return uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                          http=timed_h11(sp_cfg.header_timeout_s), timeout_keep_alive=sp_cfg.keep_alive_s)


def serve(source: str, params=None, settings=None, host: str | None = None, port: int | None = None) -> None:
    """Run the app under uvicorn until interrupted (what ``lmops serve`` calls).

    Beyond loopback it refuses to start without ``LMOPS_API_TOKEN``: the token guards admin and feedback.
    """
    params = params or Params()
    host = host or params.serve.host
    port = port or params.serve.port
    require_token_beyond_loopback(host, os.environ.get("LMOPS_API_TOKEN"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(source, params, settings)
    uvicorn.Server(uvicorn_config(app, params, host, port)).run()
