"""Readiness, Prometheus metrics, and what the server serves with which limits."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from lmcore.serve.state import ServeState, get_state

router = APIRouter()


@router.get("/health", summary="Readiness: 200 once a model is loaded, 503 before",
            responses={503: {"description": "No model loaded yet (or the first load failed)."}})
async def health(state: ServeState = Depends(get_state)):
    h = state.engine.health()
    h["in_flight"] = state.gate.in_flight
    return JSONResponse(h, status_code=200 if h["ready"] else 503)


@router.get("/metrics", summary="Prometheus metrics (text format)", response_class=Response)
async def prom(state: ServeState = Depends(get_state)):
    data, ctype = state.metrics.render()
    return Response(data, media_type=ctype)


@router.get("/v1/info", summary="Model served, limits, whether feedback needs a token")
async def info(state: ServeState = Depends(get_state)):
    h = state.engine.health()
    sp_cfg, fb_cfg = state.serve_cfg, state.feedback_cfg
    return {
        "model_name": h["model_name"], "model_version": h["model_version"], "ready": h["ready"],
        "auth_required": bool(state.api_token),
        # a model with its own chat template: the playground talks to it as a chat (/v1/chat/completions)
        "chat_template": bool(state.engine.current and state.engine.current.lm.tokenizer.chat_template),
        "limits": {"max_prompt_chars": sp_cfg.max_prompt_chars, "max_new_tokens": sp_cfg.max_new_tokens,
                   "max_concurrent": sp_cfg.max_concurrent, "request_timeout_s": sp_cfg.request_timeout_s,
                   "max_correction_chars": fb_cfg.max_correction_chars, "max_body_bytes": sp_cfg.max_body_bytes},
    }
