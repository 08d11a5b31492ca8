"""``POST /v1/feedback``: a rating (and maybe a correction) about one logged generation."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Header, Request

from lmcore.errors import LmopsError
from lmcore.feedback.store import UnknownGeneration
from lmcore.serve.bodies import documented_body, read_body
from lmcore.serve.errors import ERROR_RESPONSES
from lmcore.serve.limits import ApiError, check_text, check_token
from lmcore.serve.schemas import FeedbackRequest, FeedbackResponse
from lmcore.serve.state import ServeState, get_state

router = APIRouter()


@router.post(
    "/v1/feedback", response_model=FeedbackResponse, responses=ERROR_RESPONSES,
    summary="Rate a generation (+1/-1), optionally with a corrected completion",
    openapi_extra=documented_body(FeedbackRequest),
)
async def feedback(request: Request, authorization: str | None = Header(None),
                   state: ServeState = Depends(get_state)):
    check_token(authorization, state.api_token, request.client.host if request.client else None)
    req = await read_body(request, FeedbackRequest)
    fb_cfg = state.feedback_cfg
    check_text(req.correction, "correction", fb_cfg.max_correction_chars, "feedback.max_correction_chars")
    check_text(req.comment, "comment", fb_cfg.max_comment_chars, "feedback.max_comment_chars")
    try:
        seq = await asyncio.wrap_future(
            state.store.add_feedback_async(req.generation_id, req.rating, req.correction, req.comment)
        )
    except UnknownGeneration as e:
        raise ApiError(404, "unknown_generation", "generation_id", str(e)) from None
    except LmopsError as e:
        raise ApiError(503, "store_unavailable", None, str(e)) from None
    gen = await asyncio.to_thread(state.store.get_generation, req.generation_id)
    lm = state.engine.current.lm if state.engine.current else None
    state.metrics.feedback_stored(req.rating, lm.name if lm else "", gen["model_version"] if gen else "")
    return {"ok": True, "feedback_id": seq, "generation_id": req.generation_id}
