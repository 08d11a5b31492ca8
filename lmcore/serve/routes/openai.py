"""The OpenAI-compatible API: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``.

A thin layer over the native generation path: each choice is one :func:`run_generation` through the
same batcher (stop sequences, sampling, the feedback store, metrics), so ``n`` choices decode side by
side in one batch. The response ``id`` is the generation id of choice 0 (choice k: ``<id>-<k>``), so
``POST /v1/feedback`` takes it as ``generation_id``.

Chat prompts are rendered by the served model's chat template (its ``tokenizer_config.json`` or
``chat_template.jinja``, Hugging Face's format). A model without one uses the default template,
:data:`lmcore.data.tokenizer.PLAIN_TEMPLATE`: the messages' contents run together, each assistant turn
ended by the end-of-text token, and nothing added for the reply, so a chat of one user message is
served exactly as ``/v1/completions`` serves that text. ``developer`` messages count as ``system``.

Log-probabilities are those of the model's own distribution (temperature 1, no top-p), as vLLM reports
them; a token's ``token`` is the text it added to the output. Finish reasons: ``stop`` (end of text or a
stop sequence), ``length``, ``timeout``. Errors have OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``, made from the native error handlers' answers.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute

from lmcore.errors import LmopsError
from lmcore.serve.bodies import documented_body, read_body
from lmcore.serve.generation import generation_events
from lmcore.serve.limits import ApiError, check_max_new_tokens, check_text
from lmcore.serve.openai_schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    ChatRender,
    ChatRenderRequest,
    Completion,
    CompletionRequest,
    ModelCard,
    ModelList,
    OpenAIErrorResponse,
    unsupported_param,
)
from lmcore.serve.schemas import GenerateRequest
from lmcore.serve.state import ServeState, get_state
from lmcore.serve.transport import EventStream

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 408: "timeout_error", 413: "invalid_request_error",
               422: "invalid_request_error", 429: "rate_limit_error"}
OPENAI_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": OpenAIErrorResponse} for code in (400, 404, 408, 413, 422, 429, 503)
}
FINISH = {"eos": "stop", "stop": "stop"}  # the rest keep their native name (length, timeout)


def openai_error_body(status: int, native: dict) -> dict:
    """A native error body ``{"error": {code, field, message, ...}}`` in OpenAI's shape."""
    err = native.get("error") if isinstance(native.get("error"), dict) else {}
    return {"error": {"message": err.get("message") or "error",
                      "type": ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
                      "param": err.get("field"), "code": err.get("code")}}


class OpenAIRoute(APIRoute):
    """Answers this router's errors in OpenAI's shape: the app's own handler decides status and content."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as e:
                native = _app_handler(request, e)
                if native is None:
                    raise
                resp = await native(request, e)
                headers = {k: v for k, v in resp.headers.items() if k.lower() not in ("content-length", "content-type")}
                return JSONResponse(openai_error_body(resp.status_code, json.loads(resp.body)),
                                    status_code=resp.status_code, headers=headers)

        return route


def _app_handler(request: Request, e: Exception) -> Callable | None:
    handlers = request.app.exception_handlers
    return next((handlers[cls] for cls in type(e).__mro__ if cls in handlers), None)


router = APIRouter(route_class=OpenAIRoute)


@router.get("/v1/models", response_model=ModelList, responses=OPENAI_ERRORS,
            summary="The model served (OpenAI-compatible)")
async def list_models(state: ServeState = Depends(get_state)):
    return {"object": "list", "data": [_card(state)]}


@router.get("/v1/models/{model}", response_model=ModelCard, responses=OPENAI_ERRORS,
            summary="One model (OpenAI-compatible); 404 unless it is the one served")
async def get_model(model: str, state: ServeState = Depends(get_state)):
    return _check_model(state, model)


def _card(state: ServeState) -> dict:
    state.require_ready()
    lm = state.engine.current.lm
    return {"id": lm.name, "object": "model", "created": int(lm.loaded_at), "owned_by": "lmops",
            "version": lm.version}


@router.post("/v1/completions", response_model=None, responses={200: {"model": Completion}, **OPENAI_ERRORS},
             summary="Continue a prompt (OpenAI-compatible; stream: true for server-sent events)",
             openapi_extra=documented_body(CompletionRequest))
async def completions(request: Request, state: ServeState = Depends(get_state)):
    req = await read_body(request, CompletionRequest)
    _check_model(state, req.model)
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if not prompts:
        raise ApiError(422, "invalid_value", "prompt", "prompt: the list is empty")
    for i, p in enumerate(prompts):
        check_text(p, "prompt" if isinstance(req.prompt, str) else f"prompt.{i}", state.serve_cfg.max_prompt_chars,
                   "serve.max_prompt_chars")
    return await _respond(state, req, prompts, req.max_tokens or 16, chat=False)


@router.post("/v1/chat/completions", response_model=None,
             responses={200: {"model": ChatCompletion}, **OPENAI_ERRORS},
             summary="Answer a conversation (OpenAI-compatible; stream: true for server-sent events)",
             openapi_extra=documented_body(ChatCompletionRequest))
async def chat_completions(request: Request, state: ServeState = Depends(get_state)):
    req = await read_body(request, ChatCompletionRequest)
    if req.top_logprobs and not req.logprobs:
        raise ApiError(422, "invalid_value", "top_logprobs", "top_logprobs needs logprobs: true")
    _check_model(state, req.model)
    prompt = _render(state, req.messages)
    max_tokens = req.max_completion_tokens or req.max_tokens or state.serve_cfg.max_new_tokens
    return await _respond(state, req, [prompt], max_tokens, chat=True)


@router.post("/v1/chat/render", response_model=ChatRender, responses=OPENAI_ERRORS,
             summary="The prompt a conversation becomes (lmops' own; the playground shows it)",
             openapi_extra=documented_body(ChatRenderRequest))
async def chat_render(request: Request, state: ServeState = Depends(get_state)):
    req = await read_body(request, ChatRenderRequest)
    prompt = _render(state, req.messages)
    template = "model" if state.engine.current.lm.tokenizer.chat_template else "default"
    return {"prompt": prompt, "template": template}


def _render(state: ServeState, messages: list) -> str:
    """The messages through the served model's chat template, up to where the reply begins (its size checked)."""
    state.require_ready()
    plain = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
    try:
        prompt = state.engine.current.lm.tokenizer.render_chat(plain, add_generation_prompt=True)
    except LmopsError as e:
        raise ApiError(422, "invalid_value", "messages", str(e)) from None
    check_text(prompt, "messages", state.serve_cfg.max_prompt_chars, "serve.max_prompt_chars")
    return prompt


def _check_model(state: ServeState, model: str) -> dict:
    """The served model's card; 404 naming ``model`` when that is not it."""
    card = _card(state)
    if model != card["id"]:
        raise ApiError(404, "model_not_found", "model", f"model {model!r} is not served here; it serves {card['id']!r}")
    return card


async def _respond(state: ServeState, req: CompletionRequest | ChatCompletionRequest, prompts: list[str],
                   max_tokens: int, chat: bool) -> Response:
    """Check the request, run its choices through the engine, answer as JSON or as a stream."""
    field = "max_completion_tokens" if chat and req.max_completion_tokens else "max_tokens"
    check_max_new_tokens(max_tokens, state.serve_cfg.max_new_tokens, field)
    if (bad := unsupported_param(req.model_extra)) is not None:
        raise ApiError(422, "unsupported", bad, f"{bad} is not supported by this server")
    jobs = _jobs(state, req, prompts, max_tokens, chat)
    _acquire(state, len(jobs))
    if not req.stream:
        try:
            results = await _run_all(state, jobs, chat)
        finally:
            for _ in jobs:
                state.gate.release()
        return JSONResponse(_body(req, results, len(prompts), chat), headers={"X-Generation-Id": jobs[0][1]})
    return EventStream(_stream(state, req, jobs, chat), media_type="text/event-stream",
                       headers={"Cache-Control": "no-cache", "X-Generation-Id": jobs[0][1]})


def _jobs(state: ServeState, req: CompletionRequest | ChatCompletionRequest, prompts: list[str], max_tokens: int,
          chat: bool) -> list[tuple[GenerateRequest, str]]:
    """One native request per choice (prompt-major), each with its generation id: ``<id>``, ``<id>-1``, ..."""
    total, cap = len(prompts) * req.n, state.serve_cfg.max_batch
    if total > cap:
        raise ApiError(422, "over_limit", "n", f"{total} choices asked; at most {cap} (one decode batch)",
                       "serve.max_batch")
    logprobs = req.logprobs is not None and req.logprobs is not False
    top = (req.top_logprobs or 0) if chat else (req.logprobs or 0)
    greedy = req.temperature == 0 or req.top_p == 0
    gid = uuid.uuid4().hex
    jobs = []
    for k in range(total):
        native = GenerateRequest(
            prompt=prompts[k // req.n], max_new_tokens=max_tokens, temperature=0.0 if greedy else req.temperature,
            top_p=1.0 if greedy else req.top_p, seed=None if req.seed is None else (req.seed + k) % 2**63,
            logprobs=logprobs, top_logprobs=top, stop=req.stop, ignore_eos=req.ignore_eos,
        )
        jobs.append((native, gid if k == 0 else f"{gid}-{k}"))
    return jobs


def _acquire(state: ServeState, k: int) -> None:
    """``k`` concurrency slots, or none (429)."""
    for i in range(k):
        try:
            state.gate.acquire()
        except ApiError:
            for _ in range(i):
                state.gate.release()
            raise


async def _run_all(state: ServeState, jobs: list[tuple[GenerateRequest, str]], chat: bool) -> list[dict]:
    results: list[dict] = [{} for _ in jobs]
    async with aclosing(generation_events(state, jobs, rendered=chat)) as events:
        async for items in events:
            for i, kind, payload in items:
                if kind == "error":
                    raise payload
                if kind == "done":
                    results[i] = payload
    return results


# -- response bodies -------------------------------------------------------------------------------
def _head(req: CompletionRequest | ChatCompletionRequest, first: dict, chat: bool) -> dict:
    return {"id": first["generation_id"], "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": req.model, "system_fingerprint": first["model_version"]}


def _usage(results: list[dict], n: int) -> dict:
    """Prompt tokens once per prompt (its n choices share it), completion tokens of every choice."""
    prompt = sum(r["usage"]["prompt_tokens"] for r in results[::n])
    completion = sum(r["usage"]["completion_tokens"] for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _body(req: CompletionRequest | ChatCompletionRequest, results: list[dict], n_prompts: int, chat: bool) -> dict:
    choices = []
    for k, r in enumerate(results):
        choice: dict[str, Any] = {"index": k, "logprobs": _logprobs(r["tokens"], chat),
                                  "finish_reason": FINISH.get(r["finish_reason"], r["finish_reason"])}
        if chat:
            choice["message"] = {"role": "assistant", "content": r["completion"]}
        else:
            choice["text"] = r["completion"]
        choices.append(choice)
    return {**_head(req, results[0], chat), "choices": choices, "usage": _usage(results, len(results) // n_prompts)}


def _logprobs(tokens: list[dict] | None, chat: bool, offset: int = 0) -> dict | None:
    """Per-token records in OpenAI's shape: chat's ``content`` list, or the completions API's four lists."""
    if tokens is None:
        return None
    if chat:
        return {"content": [_chat_token(t) for t in tokens], "refusal": None}
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t["text"])
    return {"tokens": [t["text"] for t in tokens], "token_logprobs": [t["logprob"] for t in tokens],
            "top_logprobs": [{a["text"]: a["logprob"] for a in reversed(t.get("top_logprobs", []))} for t in tokens],
            "text_offset": offsets}


def _chat_token(t: dict) -> dict:
    top = [{"token": a["text"], "logprob": a["logprob"], "bytes": list(a["text"].encode())}
           for a in t.get("top_logprobs", [])]
    return {"token": t["text"], "logprob": t["logprob"], "bytes": list(t["text"].encode()), "top_logprobs": top}


# -- streams -----------------------------------------------------------------------------------------
def _data(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream(state: ServeState, req: CompletionRequest | ChatCompletionRequest,
                  jobs: list[tuple[GenerateRequest, str]], chat: bool) -> AsyncIterator[str]:
    """One chunk per token and choice, a last chunk per choice with its finish reason, the usage chunk if
    asked for, then ``[DONE]``; an error becomes one ``{"error": ...}`` chunk and ends the stream.
    Releases the request's concurrency slots when it ends."""
    head = {"id": jobs[0][1], "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": req.model, "system_fingerprint": state.engine.version}
    offsets = [0] * len(jobs)
    results: list[dict] = [{} for _ in jobs]
    # the head's JSON once: every token's chunk is that head plus its one choice
    prefix = "data: " + json.dumps(head, ensure_ascii=False)[:-1] + ', "choices": ['

    def piece(choice: dict) -> str:
        return f"{prefix}{json.dumps(choice, ensure_ascii=False)}]}}\n\n"

    try:
        if chat:
            for k in range(len(jobs)):
                yield _data({**head, "choices": [_delta(k, {"role": "assistant", "content": ""})]})
        async with aclosing(generation_events(state, jobs, rendered=chat)) as events:
            async for items in events:  # what has arrived, written as one chunk
                chunk = []
                for k, kind, payload in items:
                    if kind == "error":
                        yield "".join(chunk) + _data(openai_error_body(payload.status, payload.body()))
                        return
                    if kind == "done":
                        results[k] = payload
                        reason = FINISH.get(payload["finish_reason"], payload["finish_reason"])
                        chunk.append(piece(_piece(k, "", None, chat, reason)))
                        continue
                    text = payload.get("tail", payload.get("text", ""))
                    lp = (None if "tail" in payload or "logprob" not in payload
                          else _logprobs([payload], chat, offsets[k]))
                    if not text and lp is None:  # a token holding part of a character: nothing to show yet
                        continue
                    offsets[k] += len(text)
                    chunk.append(piece(_piece(k, text, lp, chat)))
                if chunk:
                    yield "".join(chunk)
        if req.stream_options is not None and req.stream_options.include_usage:
            yield _data({**head, "choices": [], "usage": _usage(results, req.n)})
        yield "data: [DONE]\n\n"
    finally:
        for _ in jobs:
            state.gate.release()


def _delta(k: int, delta: dict, logprobs: dict | None = None, finish: str | None = None) -> dict:
    return {"index": k, "delta": delta, "logprobs": logprobs, "finish_reason": finish}


def _piece(k: int, text: str, logprobs: dict | None, chat: bool, finish: str | None = None) -> dict:
    if chat:
        return _delta(k, {"content": text} if text or finish is None else {}, logprobs, finish)
    return {"index": k, "text": text, "logprobs": logprobs, "finish_reason": finish}
