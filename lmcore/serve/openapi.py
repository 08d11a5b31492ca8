"""The OpenAPI schema: FastAPI's, plus the request bodies the routes parse themselves (for exact 400/413/422s)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from lmcore.serve.openai_schemas import ChatCompletionRequest, CompletionRequest
from lmcore.serve.schemas import FeedbackRequest, GenerateRequest, ReloadRequest


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            schemas = spec.setdefault("components", {}).setdefault("schemas", {})
            for model in (GenerateRequest, FeedbackRequest, ReloadRequest, CompletionRequest, ChatCompletionRequest):
                js = model.model_json_schema(ref_template="#/components/schemas/{model}")
                schemas.update(js.pop("$defs", {}))
                schemas[model.__name__] = js
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi
