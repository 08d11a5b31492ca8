"""One generation through the engine: submit, collect tokens (as JSON or as server-sent events), log it.

:func:`run_generation` is what ``POST /v1/generate`` (and each choice of the OpenAI-compatible routes)
does for one request, streamed or not, stop sequences included (:mod:`lmcore.serve.stops`);
:func:`generation_events` runs several as one stream of events, which :func:`sse_events` writes as the
native ``start``/``token``/``text``/``done`` event stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lmcore.errors import LmopsError
from lmcore.model.generate import SamplingParams
from lmcore.serve.engine import Row
from lmcore.serve.limits import ApiError
from lmcore.serve.schemas import GenerateRequest
from lmcore.serve.state import ServeState
from lmcore.serve.stops import StopFilter

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
    stop: list[str]


@dataclass
class _Collected:
    """What a row produced: every id (in the decoder), its per-token records, why it stopped."""

    decoder: StreamDecoder
    stops: StopFilter
    tokens: list[dict] = field(default_factory=list)
    reason: str = "length"
    first_at: float | None = None  # perf_counter of the first token


def _submit(state: ServeState, req: GenerateRequest, rendered: bool) -> _Submitted:
    q: asyncio.Queue = asyncio.Queue()
    sp = SamplingParams(max_new_tokens=req.max_new_tokens, temperature=req.temperature, top_k=req.top_k,
                        top_p=req.top_p, seed=req.seed, stop_at_eos=not req.ignore_eos)
    deadline = time.monotonic() + state.serve_cfg.request_timeout_s
    row = Row(prompt_ids=[], sp=sp, deadline=deadline, loop=asyncio.get_running_loop(), out=q,
              top_logprobs=req.top_logprobs if req.logprobs else None)
    try:
        lm = state.engine.submit(row, prompt=req.prompt, rendered=rendered)
    except LmopsError as e:
        raise ApiError(503, "not_ready", None, str(e)) from None
    return _Submitted(row, lm, sp, q, deadline, list(req.stop or ()))


def _record(sub: _Submitted, ev: tuple, decoder: StreamDecoder) -> dict:
    """A token event as the API's per-token record (with log-probabilities when the row asked for them)."""
    rec = {"id": ev[1], "text": decoder.push(ev[1]), "prob": ev[2]}
    if len(ev) > 3:
        rec["logprob"], top = ev[3]
        if top:
            decode = sub.lm.tokenizer.decode
            rec["top_logprobs"] = [{"id": i, "text": decode([i]), "logprob": lp} for i, lp in top]
    return rec


async def _collect(sub: _Submitted, on_token: OnToken | None) -> _Collected:
    """Read the row's events until done, a stop sequence, an engine error or the deadline (plus a second)."""
    out = _Collected(sub.lm.tokenizer.stream_decoder(), StopFilter(sub.stop))
    events = sub.events
    try:
        # one timer for the whole request: a wait_for per token made a task per token
        async with asyncio.timeout(max(sub.deadline - time.monotonic() + 1.0, 0.01)):
            while True:
                ev = events.get_nowait() if not events.empty() else await events.get()
                if ev[0] == "token":
                    out.first_at = out.first_at or time.perf_counter()
                    await _hand_out(out, out.stops.push(_record(sub, ev, out.decoder)), on_token)
                    if out.stops.stopped:
                        sub.row.cancel_reason, sub.row.cancelled = "stop", True
                        out.reason = "stop"
                        return out
                elif ev[0] == "done":
                    out.reason = ev[1]
                    return out
                else:
                    raise ApiError(503, "engine_error", None, ev[1])
    except TimeoutError:
        sub.row.cancelled = True
        out.reason = "timeout"
        return out
    except BaseException:
        sub.row.cancelled = True
        raise


async def _hand_out(got: _Collected, records: list[dict], on_token: OnToken | None) -> None:
    for rec in records:
        got.tokens.append(rec)
        if on_token is not None:
            await on_token(dict(rec))  # a copy: the last record may still grow a tail


async def _finish(got: _Collected, on_token: OnToken | None) -> None:
    """The bytes of a character the last token left unfinished, through the stop filter, at the end."""
    records, tail = got.stops.finish(got.decoder.flush())
    await _hand_out(got, records, on_token)
    if got.stops.stopped:
        got.reason = "stop"
    if tail and got.tokens:
        got.tokens[-1]["text"] += tail
        if on_token is not None:
            await on_token({"tail": tail})


async def run_generation(state: ServeState, req: GenerateRequest, gid: str, on_token: OnToken | None = None, *,
                         rendered: bool = False) -> dict:
    """Submit one request to the engine and collect it (a GenerateResponse body), logged to the feedback store.

    ``on_token`` gets each ``{id, text, prob}`` as it is released (past any stop-sequence hold-back), and
    ``{"tail": text}`` for the bytes of a character the last token left unfinished. ``rendered``: the
    prompt is chat-template output (its special tokens are encoded as such).
    """
    t0 = time.perf_counter()
    sub = _submit(state, req, rendered)
    got = await _collect(sub, on_token)  # the engine reports its metrics (lmcore.serve.metrics)
    await _finish(got, on_token)
    total = time.perf_counter() - t0
    n_prompt, n_new = len(sub.row.prompt_ids), len(got.decoder.ids)
    if got.reason == "timeout" and not n_new:
        raise ApiError(408, "request_timeout", None, f"no token within {state.serve_cfg.request_timeout_s:g} s",
                       "serve.request_timeout_s")
    sp, lm, text = sub.sp, sub.lm, "".join(t["text"] for t in got.tokens)
    params_rec = {"max_new_tokens": sp.max_new_tokens, "temperature": sp.temperature, "top_p": sp.top_p,
                  "top_k": sp.top_k, "seed": sp.seed}
    if sub.stop:
        params_rec["stop"] = sub.stop
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


async def generation_events(state: ServeState, jobs: list[tuple[GenerateRequest, str]], *,
                            rendered: bool = False) -> AsyncIterator[list[tuple[int, str, Any]]]:
    """Run each ``(request, generation id)`` as its own task; yield lists of ``(job index, kind, payload)``:
    every event that has arrived, in order (a stream writes them as one chunk: when the server is
    behind, a client gets several tokens in one write rather than a write per token).

    Kinds: ``token`` (a token record, or ``{"tail": text}``), then one ``done`` (the GenerateResponse
    body) or ``error`` (an :class:`ApiError`) per job. Leaving early (the client went away) cancels
    the jobs still running.
    """
    q: asyncio.Queue = asyncio.Queue()

    async def worker(i: int, req: GenerateRequest, gid: str) -> None:
        async def on_token(tok: dict) -> None:
            q.put_nowait((i, "token", tok))

        try:
            q.put_nowait((i, "done", await run_generation(state, req, gid, on_token, rendered=rendered)))
        except ApiError as e:
            q.put_nowait((i, "error", e))
        except Exception as e:  # pragma: no cover - reported to the client, logged here
            log.exception("streamed generation failed")
            q.put_nowait((i, "error", ApiError(500, "internal", None, str(e))))

    tasks = [asyncio.create_task(worker(i, req, gid)) for i, (req, gid) in enumerate(jobs)]
    try:
        running = len(tasks)
        while running:
            items = [await q.get()]
            while not q.empty():
                items.append(q.get_nowait())
            running -= sum(item[1] != "token" for item in items)
            yield items
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()


async def sse_events(state: ServeState, req: GenerateRequest, gid: str) -> AsyncIterator[str]:
    """``start``, a ``token`` per token (a ``text`` for a flushed tail), then ``done`` or ``error``.

    The concurrency slot the caller acquired is released here, when the stream ends.
    """
    try:
        yield sse("start", {"generation_id": gid, "model_version": state.engine.version})
        async with aclosing(generation_events(state, [(req, gid)])) as events:
            async for items in events:
                yield "".join(_sse_event(req, kind, payload) for _, kind, payload in items)
    finally:
        state.gate.release()


def _sse_event(req: GenerateRequest, kind: str, payload: Any) -> str:
    if kind == "token" and "tail" in payload:
        return sse("text", {"text": payload["tail"]})
    if kind == "token":
        return sse("token", payload if req.logprobs else {"id": payload["id"], "text": payload["text"]})
    return sse(kind, payload.body() if kind == "error" else payload)
