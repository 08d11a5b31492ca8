"""What an oversized or slow client gets: a body size limit and timeouts on every phase of a request.

- :class:`ClientLimits` (pure ASGI, outermost app middleware): a body over ``serve.max_body_bytes``
  is a 413 (from ``Content-Length`` before reading, or while reading a chunked body); a body that has
  not fully arrived within ``serve.body_timeout_s`` is a 408; a client that stops reading the response
  for ``serve.send_timeout_s`` is disconnected (a stalled stream gives back its concurrency slot: stream
  with :class:`EventStream`).
- :func:`timed_h11`: uvicorn's h11 protocol, plus a connection that has not sent its request head
  within ``serve.header_timeout_s`` (of connecting, or of its last response) is closed (slowloris).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from fastapi.responses import StreamingResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from lmcore.serve.limits import ApiError

log = logging.getLogger("lmops.serve")


class _SendTimeout(Exception):
    """The client did not take the response's next chunk in time."""


async def _reply(send, err: ApiError) -> None:
    body = json.dumps(err.body(), separators=(",", ":")).encode()  # as the app's JSONResponse writes it
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class ClientLimits:
    def __init__(self, app, max_body_bytes: int, body_timeout_s: float, send_timeout_s: float):
        self.app, self.max_bytes = app, max_body_bytes
        self.body_timeout_s, self.send_timeout_s = body_timeout_s, send_timeout_s

    def _too_large(self, size: int | str) -> ApiError:
        return ApiError(413, "too_large", "body", f"request body has {size} bytes; the limit is {self.max_bytes}",
                        "serve.max_body_bytes")

    async def _read_body(self, scope, receive) -> bytes | ApiError | None:
        """The whole body, an ApiError to answer with, or None when the client left."""
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return self._too_large(int(declared))
        chunks, size = [], 0
        deadline = time.monotonic() + self.body_timeout_s
        while True:
            try:
                msg = await asyncio.wait_for(receive(), timeout=max(deadline - time.monotonic(), 0.001))
            except TimeoutError:
                return ApiError(408, "body_timeout", "body", f"request body did not arrive within "
                                f"{self.body_timeout_s:g} s", "serve.body_timeout_s")
            if msg["type"] == "http.disconnect":
                return None
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return self._too_large(f"over {size}")
            chunks.append(chunk)
            if not msg.get("more_body", False):
                return b"".join(chunks)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        got = await self._read_body(scope, receive)
        if got is None:
            return
        if isinstance(got, ApiError):
            return await _reply(send, got)
        replayed = False

        async def _receive():  # the buffered body once, then the client's own events (disconnect)
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": got, "more_body": False}
            return await receive()

        async def _send(message):
            try:
                async with asyncio.timeout(self.send_timeout_s):  # no task per chunk, as wait_for makes
                    await send(message)
            except TimeoutError:
                raise _SendTimeout from None

        try:
            await self.app(scope, _receive, _send)
        except _SendTimeout:
            log.warning("%s %s: client stopped reading for %g s; disconnected", scope["method"], scope["path"],
                        self.send_timeout_s)


class EventStream(StreamingResponse):
    """A streamed response that closes its body generator as soon as it stops, however it stops (the
    client left, its send timed out), so the generator's ``finally`` (releasing the concurrency slot,
    cancelling the generation) runs now rather than whenever the garbage collector gets to it."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


def timed_h11(header_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a deadline for each request head (pass as ``uvicorn.Config(http=...)``)."""

    class TimedH11(H11Protocol):
        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_timer()

        def _arm_header_timer(self) -> None:
            self.loop.call_later(header_timeout_s, self._header_deadline, self.cycle)

        def _header_deadline(self, cycle) -> None:
            # no new request head since the timer was armed (a new head makes a new cycle); a pipelined
            # request already started by then is being answered, not waited for
            idle = cycle is None or cycle.response_complete
            if self.cycle is cycle and idle and not self.transport.is_closing():
                self.transport.close()

    return TimedH11
