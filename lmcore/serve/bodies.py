"""Request bodies parsed by the app itself, so invalid UTF-8, bad JSON and bad values get exact 400/422s."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from lmcore.serve.limits import ApiError

M = TypeVar("M", bound=BaseModel)


async def json_body(request: Request) -> Any:
    """The body as JSON (``None`` when empty): invalid UTF-8 and bad JSON become a 400 naming the body."""
    raw = await request.body()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, "invalid_utf8", "body", f"request body is not valid UTF-8 (byte {e.start})") from None
    try:
        return json.loads(text) if text.strip() else None
    except json.JSONDecodeError as e:
        raise ApiError(400, "invalid_json", "body", f"request body is not valid JSON: {e.msg} at {e.pos}") from None


def parse(model_cls: type[M], data: Any) -> M:
    """Validate ``data`` (an empty body counts as ``{}``); a bad value becomes the app's 422."""
    if data is None:
        data = {}
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None


async def read_body(request: Request, model_cls: type[M]) -> M:
    return parse(model_cls, await json_body(request))


def documented_body(model_cls: type[BaseModel]) -> dict[str, Any]:
    """A route's ``openapi_extra`` naming ``model_cls`` as its required JSON body: the route reads the
    body itself (:func:`read_body`), so FastAPI cannot infer it from the signature."""
    schema = {"$ref": f"#/components/schemas/{model_cls.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
