"""``POST /v1/generate``: the native generation API, as one JSON response or as server-sent events."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from lmcore.serve.bodies import documented_body, read_body
from lmcore.serve.errors import ERROR_RESPONSES
from lmcore.serve.generation import run_generation, sse_events
from lmcore.serve.limits import check_max_new_tokens, check_text
from lmcore.serve.schemas import GenerateRequest, GenerateResponse
from lmcore.serve.state import ServeState, get_state
from lmcore.serve.transport import EventStream

router = APIRouter()


@router.post(
    "/v1/generate", response_model=GenerateResponse, responses=ERROR_RESPONSES,
    summary="Continue a prompt (JSON, or server-sent events with stream: true)",
    openapi_extra=documented_body(GenerateRequest),
    description="With `stream: true` the response is `text/event-stream`: one `start` event "
                "({generation_id, model_version}), a `token` event per token ({text, id, prob?}) and a final "
                "`done` event carrying the full GenerateResponse (or an `error` event). A `text` event before "
                "`done` flushes the bytes of a character left unfinished by the last token.",
)
async def generate(request: Request, state: ServeState = Depends(get_state)):
    req = await read_body(request, GenerateRequest)
    sp_cfg = state.serve_cfg
    check_text(req.prompt, "prompt", sp_cfg.max_prompt_chars, "serve.max_prompt_chars")
    check_max_new_tokens(req.max_new_tokens, sp_cfg.max_new_tokens)
    state.require_ready()
    state.gate.acquire()
    gid = uuid.uuid4().hex
    if not req.stream:
        try:
            return JSONResponse(await run_generation(state, req, gid))
        finally:
            state.gate.release()
    # the stream releases the concurrency slot when it ends
    return EventStream(sse_events(state, req, gid), media_type="text/event-stream",
                       headers={"Cache-Control": "no-cache", "X-Generation-Id": gid})
