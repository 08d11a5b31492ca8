"""The FastAPI app: generate (plain or SSE), feedback, health, metrics, admin reload, the playground.

``create_app`` builds everything an app needs (engine, feedback store, metrics registry) so
tests and benchmarks can run several apps side by side. The model loads in a background
thread at startup: ``/health`` answers 503 until it is ready.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmcore.errors import LmopsError
from lmcore.serve.limits import ApiError, ConcurrencyGate, check_max_new_tokens, check_text, check_token, error_body
from lmcore.serve.schemas import (
    ErrorResponse,
    FeedbackRequest,
    FeedbackResponse,
    GenerateRequest,
    GenerateResponse,
    ReloadRequest,
    ReloadResponse,
)

log = logging.getLogger("lmops.serve")
STATIC = Path(__file__).with_name("static")
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 408, 413, 422, 429, 503)
}


def create_app(source: str, params=None, settings=None, *, store=None, api_token: str | None = None) -> FastAPI:
    """An app serving ``source`` (``models:/<name>@<alias>`` or a model folder).

    ``api_token`` defaults to ``$LMOPS_API_TOKEN``; when set it guards feedback and admin endpoints.
    """
    from lmcore.config import Params
    from lmcore.feedback import FeedbackStore
    from lmcore.serve.engine import Engine, Row
    from lmcore.serve.metrics import Metrics, MetricsMiddleware
    from lmcore.settings import get_settings

    params = params or Params()
    sp_cfg, fb_cfg = params.serve, params.feedback
    settings = settings or get_settings()
    token = api_token if api_token is not None else os.environ.get("LMOPS_API_TOKEN") or None
    metrics = Metrics()
    engine = Engine(
        source, max_batch=sp_cfg.max_batch, max_new_tokens=sp_cfg.max_new_tokens,
        batch_window_ms=sp_cfg.batch_window_ms,
        on_tokens=metrics.tokens.inc, on_batch=metrics.batch_rows.observe,
    )
    engine.on_swap = lambda _old, _new: metrics.set_model(engine.current.lm.name, engine.current.lm.version)
    gate = ConcurrencyGate(sp_cfg.max_concurrent)
    own_store = store is None

    def _initial_load() -> None:
        result = engine.reload()
        metrics.reloads.labels(result="ok" if result["ok"] else "failed").inc()
        engine.start_polling(sp_cfg.poll_interval_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.store = store if store is not None else FeedbackStore(settings.feedback_db)
        threading.Thread(target=_initial_load, name="initial-load", daemon=True).start()
        try:
            yield
        finally:
            engine.stop()
            if own_store:
                app.state.store.close()

    app = FastAPI(
        title="lmops model server",
        version="1",
        summary="Generate text with the champion model, send feedback, watch health and metrics.",
        lifespan=lifespan,
    )
    app.state.engine, app.state.metrics, app.state.gate, app.state.params = engine, metrics, gate, params
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    # -- errors: always {"error": {code, field, message, limit?}} ---------------------------
    @app.exception_handler(ApiError)
    async def _api_error(_req: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_req: Request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": "invalid"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"] or ["body"]
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body("invalid_json", "body", f"request body is not valid JSON: {first['msg']}"),
                                status_code=400)
        details = [{"field": ".".join(str(p) for p in x.get("loc", ()) if p != "body") or "body", "message": x["msg"]}
                   for x in errors]
        return JSONResponse(
            error_body("invalid_value", ".".join(loc), f"{'.'.join(loc)}: {first['msg']}", details=details),
            status_code=422,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req: Request, e: StarletteHTTPException):
        return JSONResponse(error_body("http_error", None, str(e.detail)), status_code=e.status_code)

    @app.exception_handler(LmopsError)
    async def _lmops_error(_req: Request, e: LmopsError):
        return JSONResponse(error_body("error", None, str(e)), status_code=400)

    async def _json_body(request: Request) -> Any:
        """Parse the body ourselves: invalid UTF-8 and bad JSON become a 400 naming the body."""
        raw = await request.body()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ApiError(400, "invalid_utf8", "body", f"request body is not valid UTF-8 (byte {e.start})") from None
        try:
            return json.loads(text) if text.strip() else None
        except json.JSONDecodeError as e:
            raise ApiError(400, "invalid_json", "body", f"request body is not valid JSON: {e.msg} at {e.pos}") from None

    def _parse(model_cls, data: Any):
        from pydantic import ValidationError

        if data is None:
            data = {}
        try:
            return model_cls.model_validate(data)
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from None

    def _require_ready():
        if not engine.ready:
            raise ApiError(503, "not_ready", None, "model is still loading" if not engine.last_reload_error
                           else f"no model loaded: {engine.last_reload_error}")

    # -- pages and probes ----------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def playground():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        path = (STATIC / name).resolve()
        if path.parent != STATIC.resolve() or not path.is_file():
            raise ApiError(404, "not_found", "name", f"no static file {name!r}")
        return FileResponse(path)

    @app.get("/health", summary="Readiness: 200 once a model is loaded, 503 before",
             responses={503: {"description": "No model loaded yet (or the first load failed)."}})
    async def health():
        h = engine.health()
        h["in_flight"] = gate.in_flight
        return JSONResponse(h, status_code=200 if h["ready"] else 503)

    @app.get("/metrics", summary="Prometheus metrics (text format)", response_class=Response)
    async def prom():
        data, ctype = metrics.render()
        return Response(data, media_type=ctype)

    @app.get("/v1/info", summary="Model served, limits, whether feedback needs a token")
    async def info():
        h = engine.health()
        return {
            "model_name": h["model_name"], "model_version": h["model_version"], "ready": h["ready"],
            "auth_required": bool(token),
            "limits": {"max_prompt_chars": sp_cfg.max_prompt_chars, "max_new_tokens": sp_cfg.max_new_tokens,
                       "max_concurrent": sp_cfg.max_concurrent, "request_timeout_s": sp_cfg.request_timeout_s,
                       "max_correction_chars": fb_cfg.max_correction_chars},
        }

    # -- generation ----------------------------------------------------------------------------
    async def _run(req: GenerateRequest, gid: str, on_token=None) -> dict:
        """Submit one request to the engine and collect it; calls ``on_token(piece, id, prob)``."""
        from lmcore.generate import SamplingParams

        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        sp = SamplingParams(max_new_tokens=req.max_new_tokens, temperature=req.temperature, top_k=req.top_k,
                            top_p=req.top_p, seed=req.seed, stop_at_eos=not req.ignore_eos)
        deadline = time.monotonic() + sp_cfg.request_timeout_s
        row = Row(prompt_ids=[], sp=sp, deadline=deadline, loop=loop, out=q)
        try:
            lm = engine.submit(row, prompt=req.prompt)
        except LmopsError as e:
            raise ApiError(503, "not_ready", None, str(e)) from None
        metrics.in_flight.inc()
        ids: list[int] = []
        tokens: list[dict] = []
        text, reason, first_at = "", "length", None
        try:
            while True:
                remaining = deadline - time.monotonic() + 1.0
                try:
                    ev = await asyncio.wait_for(q.get(), timeout=max(remaining, 0.01))
                except TimeoutError:
                    row.cancelled = True
                    reason = "timeout"
                    break
                if ev[0] == "token":
                    first_at = first_at or time.perf_counter()
                    ids.append(ev[1])
                    full = lm.tokenizer.decode(ids)
                    piece = "" if full.endswith("\ufffd") else full[len(text):]
                    if piece:
                        text = full
                    tokens.append({"id": ev[1], "text": piece, "prob": ev[2]})
                    if on_token is not None:
                        await on_token(tokens[-1])
                elif ev[0] == "done":
                    reason = ev[1]
                    break
                else:
                    raise ApiError(503, "engine_error", None, ev[1])
        except BaseException:
            row.cancelled = True
            raise
        finally:
            metrics.in_flight.dec()
        full = lm.tokenizer.decode(ids)
        if len(full) > len(text) and tokens:  # bytes of an unfinished character, flushed at the end
            tokens[-1]["text"] += full[len(text):]
            if on_token is not None:
                await on_token({"tail": full[len(text):]})
        text = full
        total = time.perf_counter() - t0
        metrics.generations.labels(finish_reason=reason).inc()
        if reason == "timeout" and not ids:
            raise ApiError(408, "request_timeout", None, f"no token within {sp_cfg.request_timeout_s:g} s",
                           "serve.request_timeout_s")
        params_rec = {"max_new_tokens": sp.max_new_tokens, "temperature": sp.temperature, "top_p": sp.top_p,
                      "top_k": sp.top_k, "seed": sp.seed}
        fut = app.state.store.log_generation_async(
            id=gid, model_version=lm.version, prompt=req.prompt, completion=text, params=params_rec,
            latency_ms=total * 1000, prompt_tokens=len(row.prompt_ids), completion_tokens=len(ids),
        )
        await asyncio.wrap_future(fut)
        return {
            "generation_id": gid, "model_name": lm.name, "model_version": lm.version, "completion": text,
            "finish_reason": reason, "tokens": tokens if req.logprobs else None,
            "usage": {"prompt_tokens": len(row.prompt_ids), "completion_tokens": len(ids)},
            "timings": {"queue_ms": round(((first_at or time.perf_counter()) - t0) * 1000, 3),
                        "total_ms": round(total * 1000, 3),
                        "tokens_per_s": round(len(ids) / total, 2) if total > 0 else 0.0},
        }

    @app.post(
        "/v1/generate", response_model=GenerateResponse, responses=_ERRORS,
        summary="Continue a prompt (JSON, or server-sent events with stream: true)",
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/GenerateRequest"}}
        }}},
        description="With `stream: true` the response is `text/event-stream`: one `start` event "
                    "({generation_id, model_version}), a `token` event per token ({text, id, prob?}) and a final "
                    "`done` event carrying the full GenerateResponse (or an `error` event). A `text` event before "
                    "`done` flushes the bytes of a character left unfinished by the last token.",
    )
    async def generate(request: Request):
        req = _parse(GenerateRequest, await _json_body(request))
        check_text(req.prompt, "prompt", sp_cfg.max_prompt_chars, "serve.max_prompt_chars")
        check_max_new_tokens(req.max_new_tokens, sp_cfg.max_new_tokens)
        _require_ready()
        gate.acquire()
        gid = uuid.uuid4().hex
        if not req.stream:
            try:
                return JSONResponse(await _run(req, gid))
            finally:
                gate.release()

        async def events():
            q: asyncio.Queue = asyncio.Queue()

            async def on_token(tok: dict) -> None:
                q.put_nowait(("token", tok))

            async def worker():
                try:
                    q.put_nowait(("done", await _run(req, gid, on_token)))
                except ApiError as e:
                    q.put_nowait(("error", e.body()))
                except Exception as e:  # pragma: no cover - reported to the client, logged here
                    log.exception("streamed generation failed")
                    q.put_nowait(("error", error_body("internal", None, str(e))))

            task = asyncio.create_task(worker())
            try:
                lm_ver = engine.version
                yield _sse("start", {"generation_id": gid, "model_version": lm_ver})
                while True:
                    kind, payload = await q.get()
                    if kind == "token" and "tail" in payload:
                        yield _sse("text", {"text": payload["tail"]})
                        continue
                    if kind == "token":
                        tok = payload if req.logprobs else {"id": payload["id"], "text": payload["text"]}
                        yield _sse("token", tok)
                        continue
                    yield _sse(kind, payload)
                    break
            finally:
                if not task.done():
                    task.cancel()
                gate.release()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Generation-Id": gid})

    # -- feedback and admin --------------------------------------------------------------------
    @app.post(
        "/v1/feedback", response_model=FeedbackResponse, responses=_ERRORS,
        summary="Rate a generation (+1/-1), optionally with a corrected completion",
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/FeedbackRequest"}}
        }}},
    )
    async def feedback(request: Request, authorization: str | None = Header(None)):
        check_token(authorization, token, request.client.host if request.client else None)
        req = _parse(FeedbackRequest, await _json_body(request))
        check_text(req.correction, "correction", fb_cfg.max_correction_chars, "feedback.max_correction_chars")
        check_text(req.comment, "comment", fb_cfg.max_comment_chars, "feedback.max_comment_chars")
        from lmcore.feedback import UnknownGeneration

        try:
            seq = await asyncio.wrap_future(
                app.state.store.add_feedback_async(req.generation_id, req.rating, req.correction, req.comment)
            )
        except UnknownGeneration as e:
            raise ApiError(404, "unknown_generation", "generation_id", str(e)) from None
        except LmopsError as e:
            raise ApiError(503, "store_unavailable", None, str(e)) from None
        metrics.feedback.labels(rating=str(req.rating)).inc()
        return {"ok": True, "feedback_id": seq, "generation_id": req.generation_id}

    @app.post(
        "/admin/reload", response_model=ReloadResponse, responses=_ERRORS,
        summary="Load the model again (e.g. after the champion alias moved) and swap it in atomically",
        description="Guarded by the bearer token (LMOPS_API_TOKEN); loopback-only when no token is set. "
                    "A version that fails to load leaves the old one serving and answers 422 with ok=false.",
    )
    async def admin_reload(request: Request, authorization: str | None = Header(None)):
        check_token(authorization, token, request.client.host if request.client else None,
                    loopback_only_without_token=True)
        req = _parse(ReloadRequest, await _json_body(request))
        result = await asyncio.to_thread(engine.reload, req.model)
        metrics.reloads.labels(result="ok" if result["ok"] else "failed").inc()
        return JSONResponse(result, status_code=200 if result["ok"] else 422)

    def openapi() -> dict:
        """The generated schema plus the request bodies we parse ourselves (for exact 400/413/422s)."""
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            spec = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            schemas = spec.setdefault("components", {}).setdefault("schemas", {})
            for model in (GenerateRequest, FeedbackRequest):
                js = model.model_json_schema(ref_template="#/components/schemas/{model}")
                schemas.update(js.pop("$defs", {}))
                schemas[model.__name__] = js
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi
    return app


def _sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def serve(source: str, params=None, settings=None, host: str | None = None, port: int | None = None) -> None:
    """Run the app under uvicorn until interrupted (what ``lmops serve`` calls)."""
    import uvicorn

    from lmcore.config import Params

    params = params or Params()
    host = host or params.serve.host
    port = port or params.serve.port
    if host not in ("127.0.0.1", "localhost", "::1") and not os.environ.get("LMOPS_API_TOKEN"):
        log.warning("binding %s without LMOPS_API_TOKEN: feedback is open to anyone who can reach it", host)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(source, params, settings)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
