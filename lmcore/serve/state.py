"""What one app serves with: engine, feedback store, limits, metrics and the API token, built once per app.

``create_app`` puts a :class:`ServeState` on ``app.state.lmops``; routes reach it through the
:func:`get_state` dependency, so several apps can live side by side in one process.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import Request

from lmcore.config import Params
from lmcore.feedback.store import FeedbackStore
from lmcore.serve.engine import Engine
from lmcore.serve.limits import ApiError, ConcurrencyGate
from lmcore.serve.metrics import Metrics
from lmcore.settings import get_settings

if TYPE_CHECKING:
    from lmcore.config import FeedbackParams, Params, ServeParams
    from lmcore.feedback.store import FeedbackStore
    from lmcore.serve.engine import Engine
    from lmcore.settings import Settings


@dataclass
class ServeState:
    engine: Engine
    metrics: Metrics
    gate: ConcurrencyGate  # serve.max_concurrent generations in flight, then 429
    params: Params
    settings: Settings
    api_token: str | None  # guards feedback and admin when set
    store: FeedbackStore | None = None  # opened by start() unless one was given
    own_store: bool = True  # close the store on stop()

    @classmethod
    def build(cls, source: str, params=None, settings=None, *, store=None, api_token: str | None = None) -> ServeState:
        """The engine for ``source`` (not loaded yet), a metrics registry of its own, the limits from ``params``."""
        params = params or Params()
        sp_cfg = params.serve
        metrics = Metrics()
        engine = Engine(
            source, max_batch=sp_cfg.max_batch, max_new_tokens=sp_cfg.max_new_tokens,
            batch_window_ms=sp_cfg.batch_window_ms, compiled=sp_cfg.compile_decode,
            on_batch=metrics.batch_rows.observe, observe=metrics.for_version,
            # a prompt within the character limit rarely has more tokens than characters; one that has
            # keeps its last ones, as a prompt over the model's context does
            max_prompt_tokens=sp_cfg.max_prompt_chars,
        )
        metrics.watch(engine.loads)
        engine.on_swap = lambda _old, _new: metrics.set_model(engine.current.lm.name, engine.current.lm.version)
        token = api_token if api_token is not None else os.environ.get("LMOPS_API_TOKEN") or None
        return cls(engine=engine, metrics=metrics, gate=ConcurrencyGate(sp_cfg.max_concurrent), params=params,
                   settings=settings or get_settings(), api_token=token, store=store, own_store=store is None)

    @property
    def serve_cfg(self) -> ServeParams:
        return self.params.serve

    @property
    def feedback_cfg(self) -> FeedbackParams:
        return self.params.feedback

    def start(self) -> None:
        """At app startup: open the feedback store, load the model in a background thread."""
        if self.store is None:
            self.store = FeedbackStore(self.settings.feedback_db)
        threading.Thread(target=self._initial_load, name="initial-load", daemon=True).start()

    def stop(self) -> None:
        self.engine.stop()
        if self.own_store and self.store is not None:
            self.store.close()
            self.store = None  # a restarted app opens a fresh one

    def _initial_load(self) -> None:
        self.record_reload(self.engine.reload())
        self.engine.start_polling(self.serve_cfg.poll_interval_s)

    def record_reload(self, result: dict) -> None:
        self.metrics.reloads.labels(result="ok" if result["ok"] else "failed").inc()

    def require_ready(self) -> None:
        """503 until a model is loaded (naming the load error, if the first load failed)."""
        engine = self.engine
        if not engine.ready:
            raise ApiError(503, "not_ready", None, "model is still loading" if not engine.last_reload_error
                           else f"no model loaded: {engine.last_reload_error}")


def get_state(request: Request) -> ServeState:
    """FastAPI dependency: the state of the app serving this request."""
    return request.app.state.lmops
