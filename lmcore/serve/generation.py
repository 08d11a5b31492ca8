"""One generation through the engine: submit, collect tokens (as JSON or as server-sent events), log it.

:func:`run_generation` is what ``POST /v1/generate`` does for one request, streamed or not;
:func:`sse_events` wraps it into the ``start``/``token``/``text``/``done`` event stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lmcore.errors import LmopsError
from lmcore.model.generate import SamplingParams
from lmcore.serve.engine import Row
from lmcore.serve.limits import ApiError, error_body
from lmcore.serve.schemas import GenerateRequest
from lmcore.serve.state import ServeState

if TYPE_CHECKING:
    from lmcore.data.tokenizer import StreamDecoder
    from lmcore.model.generate import SamplingParams
    from lmcore.serve.engine import LoadedModel, Row

log = logging.getLogger("lmops.serve")

OnToken = Callable[[dict], Awaitable[None]]


@dataclass
class _Submitted:
    """A request admitted by the engine, and the channel its events come back on."""

    row: Row
    lm: LoadedModel
    sp: SamplingParams
    events: asyncio.Queue
    deadline: float


@dataclass
class _Collected:
    """What a row produced: every id (in the decoder), its per-token records, why it stopped."""

    decoder: StreamDecoder
    tokens: list[dict] = field(default_factory=list)
    reason: str = "length"
    first_at: float | None = None  # perf_counter of the first token


def _submit(state: ServeState, req: GenerateRequest) -> _Submitted:
    q: asyncio.Queue = asyncio.Queue()
    sp = SamplingParams(max_new_tokens=req.max_new_tokens, temperature=req.temperature, top_k=req.top_k,
                        top_p=req.top_p, seed=req.seed, stop_at_eos=not req.ignore_eos)
    deadline = time.monotonic() + state.serve_cfg.request_timeout_s
    row = Row(prompt_ids=[], sp=sp, deadline=deadline, loop=asyncio.get_running_loop(), out=q)
    try:
        lm = state.engine.submit(row, prompt=req.prompt)
    except LmopsError as e:
        raise ApiError(503, "not_ready", None, str(e)) from None
    return _Submitted(row, lm, sp, q, deadline)


async def _collect(sub: _Submitted, on_token: OnToken | None) -> _Collected:
    """Read the row's events until done, an engine error or the deadline (plus a second of grace)."""
    out = _Collected(sub.lm.tokenizer.stream_decoder())
    try:
        while True:
            remaining = sub.deadline - time.monotonic() + 1.0
            try:
                ev = await asyncio.wait_for(sub.events.get(), timeout=max(remaining, 0.01))
            except TimeoutError:
                sub.row.cancelled = True
                out.reason = "timeout"
                return out
            if ev[0] == "token":
                out.first_at = out.first_at or time.perf_counter()
                out.tokens.append({"id": ev[1], "text": out.decoder.push(ev[1]), "prob": ev[2]})
                if on_token is not None:
                    await on_token(dict(out.tokens[-1]))  # a copy: the last record may still grow a tail
            elif ev[0] == "done":
                out.reason = ev[1]
                return out
            else:
                raise ApiError(503, "engine_error", None, ev[1])
    except BaseException:
        sub.row.cancelled = True
        raise


async def run_generation(state: ServeState, req: GenerateRequest, gid: str, on_token: OnToken | None = None) -> dict:
    """Submit one request to the engine and collect it (a GenerateResponse body), logged to the feedback store.

    ``on_token`` gets each ``{id, text, prob}`` as it arrives, and ``{"tail": text}`` for the bytes of
    a character the last token left unfinished.
    """
    t0 = time.perf_counter()
    sub = _submit(state, req)
    state.metrics.in_flight.inc()
    try:
        got = await _collect(sub, on_token)
    finally:
        state.metrics.in_flight.dec()
    tail = got.decoder.flush()
    if tail and got.tokens:  # bytes of an unfinished character, flushed at the end
        got.tokens[-1]["text"] += tail
        if on_token is not None:
            await on_token({"tail": tail})
    total = time.perf_counter() - t0
    state.metrics.generations.labels(finish_reason=got.reason).inc()
    n_prompt, n_new = len(sub.row.prompt_ids), len(got.decoder.ids)
    if got.reason == "timeout" and not n_new:
        raise ApiError(408, "request_timeout", None, f"no token within {state.serve_cfg.request_timeout_s:g} s",
                       "serve.request_timeout_s")
    sp, lm, text = sub.sp, sub.lm, got.decoder.text
    params_rec = {"max_new_tokens": sp.max_new_tokens, "temperature": sp.temperature, "top_p": sp.top_p,
                  "top_k": sp.top_k, "seed": sp.seed}
    fut = state.store.log_generation_async(
        id=gid, model_version=lm.version, prompt=req.prompt, completion=text, params=params_rec,
        latency_ms=total * 1000, prompt_tokens=n_prompt, completion_tokens=n_new,
    )
    await asyncio.wrap_future(fut)
    return {
        "generation_id": gid, "model_name": lm.name, "model_version": lm.version, "completion": text,
        "finish_reason": got.reason, "tokens": got.tokens if req.logprobs else None,
        "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_new},
        "timings": {"queue_ms": round(((got.first_at or time.perf_counter()) - t0) * 1000, 3),
                    "total_ms": round(total * 1000, 3),
                    "tokens_per_s": round(n_new / total, 2) if total > 0 else 0.0},
    }


def sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


async def sse_events(state: ServeState, req: GenerateRequest, gid: str) -> AsyncIterator[str]:
    """``start``, a ``token`` per token (a ``text`` for a flushed tail), then ``done`` or ``error``.

    The generation runs as its own task; leaving early (the client went away) cancels it. The
    concurrency slot the caller acquired is released here, when the stream ends.
    """
    q: asyncio.Queue = asyncio.Queue()

    async def on_token(tok: dict) -> None:
        q.put_nowait(("token", tok))

    async def worker() -> None:
        try:
            q.put_nowait(("done", await run_generation(state, req, gid, on_token)))
        except ApiError as e:
            q.put_nowait(("error", e.body()))
        except Exception as e:  # pragma: no cover - reported to the client, logged here
            log.exception("streamed generation failed")
            q.put_nowait(("error", error_body("internal", None, str(e))))

    task = asyncio.create_task(worker())
    try:
        yield sse("start", {"generation_id": gid, "model_version": state.engine.version})
        while True:
            kind, payload = await q.get()
            if kind == "token" and "tail" in payload:
                yield sse("text", {"text": payload["tail"]})
            elif kind == "token":
                yield sse("token", payload if req.logprobs else {"id": payload["id"], "text": payload["text"]})
            else:
                yield sse(kind, payload)
                break
    finally:
        if not task.done():
            task.cancel()
        state.gate.release()
