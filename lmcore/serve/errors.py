"""Every error the app answers is ``{"error": {code, field, message, limit?}}``: the handlers that make it so."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmcore.errors import LmopsError
from lmcore.serve.limits import ApiError, error_body
from lmcore.serve.schemas import ErrorResponse

# The error statuses documented in the OpenAPI schema of every JSON endpoint.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 408, 413, 422, 429, 503)
}


async def api_error(_req: Request, e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def validation_error(_req: Request, e: RequestValidationError) -> JSONResponse:
    """Bad JSON is a 400 naming the body; a bad value is a 422 naming its field (all of them in ``details``)."""
    errors = e.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": "invalid"}
    if first.get("type") == "json_invalid":
        return JSONResponse(error_body("invalid_json", "body", f"request body is not valid JSON: {first['msg']}"),
                            status_code=400)
    field = _field(first.get("loc", ()))
    details = [{"field": _field(x.get("loc", ())), "message": x["msg"]} for x in errors]
    return JSONResponse(error_body("invalid_value", field, f"{field}: {first['msg']}", details=details),
                        status_code=422)


def _field(loc) -> str:
    """A pydantic error location as a dotted field name; an empty key shows as ``""``, none as ``body``."""
    return ".".join(str(p) if p != "" else '""' for p in loc if p != "body") or "body"


async def http_error(_req: Request, e: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(error_body("http_error", None, str(e.detail)), status_code=e.status_code)


async def lmops_error(_req: Request, e: LmopsError) -> JSONResponse:
    return JSONResponse(error_body("error", None, str(e)), status_code=400)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(LmopsError, lmops_error)
