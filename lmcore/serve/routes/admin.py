"""``POST /admin/reload``: load the model again and swap it in (token-guarded, loopback-only without one)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse

from lmcore.serve.bodies import documented_body, read_body
from lmcore.serve.errors import ERROR_RESPONSES
from lmcore.serve.limits import check_token
from lmcore.serve.schemas import ReloadRequest, ReloadResponse
from lmcore.serve.state import ServeState, get_state

router = APIRouter()


@router.post(
    "/admin/reload", response_model=ReloadResponse, responses=ERROR_RESPONSES,
    summary="Load the model again (e.g. after the champion alias moved) and swap it in atomically",
    description="Guarded by the bearer token (LMOPS_API_TOKEN); loopback-only when no token is set. "
                "A version that fails to load leaves the old one serving and answers 422 with ok=false.",
    openapi_extra=documented_body(ReloadRequest, required=False),
)
async def admin_reload(request: Request, authorization: str | None = Header(None),
                       state: ServeState = Depends(get_state)):
    check_token(authorization, state.api_token, request.client.host if request.client else None,
                loopback_only_without_token=True)
    req = await read_body(request, ReloadRequest)
    result = await asyncio.to_thread(state.engine.reload, req.model)
    state.record_reload(result)
    return JSONResponse({**result, "field": None if result["ok"] else "model"},
                        status_code=200 if result["ok"] else 422)
