"""Request bodies parsed by the app itself, so invalid UTF-8, bad JSON and bad values get exact 400/422s."""

from __future__ import annotations

import json
import re
from typing import Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from lmcore.serve.limits import ApiError

M = TypeVar("M", bound=BaseModel)
_SURROGATE = re.compile(r"[\ud800-\udfff]")


async def json_body(request: Request) -> Any:
    """The body as JSON (``None`` when empty): invalid UTF-8 and bad JSON become a 400 naming the body."""
    raw = await request.body()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, "invalid_utf8", "body", f"request body is not valid UTF-8 (byte {e.start})") from None
    try:
        data = json.loads(text) if text.strip() else None
    except json.JSONDecodeError as e:
        raise ApiError(400, "invalid_json", "body", f"request body is not valid JSON: {e.msg} at {e.pos}") from None
    bad = _surrogate_at(data)
    if bad is not None:
        raise ApiError(422, "invalid_text", bad or "body",
                       f"{bad or 'body'}: contains a lone UTF-16 surrogate (an escape like \\ud800 without its "
                       "pair), which is not text") from None
    return data


def _surrogate_at(value: Any, path: str = "") -> str | None:
    """The dotted path of the first string (or key) holding a lone surrogate: JSON allows ``"\\ud800"``,
    UTF-8 (the tokenizer, the feedback store) does not."""
    if isinstance(value, str):
        return path if _SURROGATE.search(value) else None
    if isinstance(value, dict):
        for k, v in value.items():
            key = k.encode("utf-8", "backslashreplace").decode()  # printable in the error body
            sub = f"{path}.{key}" if path else key
            if key != k:
                return sub
            if (found := _surrogate_at(v, sub)) is not None:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            if (found := _surrogate_at(v, f"{path}.{i}" if path else str(i))) is not None:
                return found
    return None


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


def documented_body(model_cls: type[BaseModel], required: bool = True) -> dict[str, Any]:
    """A route's ``openapi_extra`` naming ``model_cls`` as its JSON body: the route reads the body itself
    (:func:`read_body`), so FastAPI cannot infer it from the signature. List ``model_cls`` in
    :mod:`lmcore.serve.openapi` too."""
    schema = {"$ref": f"#/components/schemas/{model_cls.__name__}"}
    return {"requestBody": {"required": required, "content": {"application/json": {"schema": schema}}}}
