"""Take any input: schemathesis over every operation in the live server's own OpenAPI schema, the bad
inputs the issue found, the admin token rule, the body size limit and the slow-client timeouts.

The fuzz is schema-driven: an endpoint added to the app is fuzzed without touching this file.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from _serve_helpers import free_port, make_model, thread_server

from lmcore.config import Params, ServeParams

pytestmark = pytest.mark.code

EXAMPLES = 25  # per operation and generation mode (positive: valid by the schema; negative: invalid)
FUZZ_SECONDS = 45.0  # wall-clock cap for the whole fuzz; each operation gets a fair share of what is left
PARAMS = Params(serve=ServeParams(max_prompt_chars=200, max_new_tokens=64, max_concurrent=16, poll_interval_s=0,
                                  max_body_bytes=16384, body_timeout_s=1.0, header_timeout_s=1.0,
                                  send_timeout_s=1.0, compile_decode=False))


@pytest.fixture(scope="module")
def server(tmp_path_factory, store):
    """One live server (configured as `lmops serve` configures uvicorn) shared by every test here."""
    from lmcore.serve.app import create_app

    model = make_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)
    with thread_server(create_app(str(model), PARAMS, store=store, api_token=""), params=PARAMS) as base:
        yield base


def error_field(status: int, body) -> str | None:
    """The field a 4xx body names: ``error.field`` (native), ``error.param`` (OpenAI's shape) or ``field``."""
    if not isinstance(body, dict):
        return None
    err = body.get("error")
    if isinstance(err, dict):
        return err.get("field") or err.get("param") or (err.get("limit") if status in (408, 429) else None)
    return body.get("field")


def problem(resp) -> str | None:
    """Why a response breaks the contract: a 5xx, or a 4xx that is not JSON naming the field."""
    if resp.status_code >= 500:
        return f"server error {resp.status_code}: {resp.text[:300]}"
    if resp.status_code >= 400:
        try:
            body = resp.json()
        except ValueError:
            return f"{resp.status_code} body is not JSON: {resp.text[:200]}"
        if not error_field(resp.status_code, body):
            return f"{resp.status_code} names no field: {resp.text[:300]}"
    return None


@pytest.mark.slow
def test_fuzz_every_operation_no_5xx_and_4xx_name_the_field(server):
    """Every operation of /openapi.json, positive and negative examples: 0 server errors."""
    import requests  # lazy: schemathesis's transport, only this test needs it
    import schemathesis  # lazy: only this test needs it
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(server + "/openapi.json")
    ops = [r.ok() for r in schema.get_all_operations()]
    labels = {op.label for op in ops}
    assert {"POST /v1/generate", "POST /v1/feedback", "POST /admin/reload", "GET /health"} <= labels
    # positive examples refer to what exists here, so they reach past the 404s into the real work
    live = {"model": httpx.get(server + "/v1/info").json()["model_name"],
            "generation_id": httpx.post(server + "/v1/generate", json={"prompt": "x", "max_new_tokens": 2})
            .json()["generation_id"]}
    failures: list[str] = []
    calls: dict[str, int] = {}
    runs = [(op, mode) for op in ops for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]
    end = time.monotonic() + FUZZ_SECONDS
    def fuzz(op, mode, share_end: float):
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=mode))
        def run(case):
            if time.monotonic() > share_end:
                return
            if mode == GenerationMode.POSITIVE and isinstance(case.body, dict):
                case.body.update({k: v for k, v in live.items() if k in case.body})
            calls[op.label] = calls.get(op.label, 0) + 1
            try:
                why = problem(case.call(base_url=server, timeout=60))
            except requests.RequestException as e:  # no answer in time is a finding too, with its input
                why = f"no answer: {type(e).__name__}"
            if why is not None:
                failures.append(f"{op.label} [{mode.value}] {why}\n    {case.method} {case.formatted_path} "
                                f"headers={case.headers!r} body={case.body!r}")

        with contextlib.suppress(Unsatisfiable):  # nothing here can be made invalid (no parameters, no body)
            run()

    for i, (op, mode) in enumerate(runs):
        fuzz(op, mode, time.monotonic() + (end - time.monotonic()) / (len(runs) - i))
    assert not failures, "\n".join(failures[:20])
    assert set(calls) == labels  # every operation was called, within the time cap
    assert httpx.get(server + "/health").json()["ready"]


def post_raw(base: str, path: str, raw: bytes) -> httpx.Response:
    return httpx.post(base + path, content=raw, headers={"content-type": "application/json"}, timeout=30)


def test_the_issues_inputs_are_4xx_naming_the_field_and_store_nothing(server, store):
    """A lone surrogate (valid JSON, not text), a seed past 64 bits, a surrogate in a feedback comment."""
    gid = httpx.post(server + "/v1/generate", json={"prompt": "x", "max_new_tokens": 2}).json()["generation_id"]
    before = store.counts()
    cases = [
        ("/v1/generate", b'{"prompt":"\\ud800"}', 422, "prompt"),
        ("/v1/generate", b'{"prompt":"ok \\udfff"}', 422, "prompt"),
        ("/v1/generate", b'{"prompt":"x","seed":99999999999999999999999}', 422, "seed"),
        ("/v1/generate", b'{"prompt":"x","seed":9223372036854775808}', 422, "seed"),
        ("/v1/feedback", b'{"generation_id":"%s","rating":1,"comment":"\\ud800"}' % gid.encode(), 422, "comment"),
        ("/v1/feedback", b'{"generation_id":"%s","rating":1,"correction":"a\\ud83d"}' % gid.encode(), 422,
         "correction"),
        ("/v1/generate", b'{"prompt":"x","\\ud800":1}', 422, "\\ud800"),
        ("/admin/reload", b'{"model":"\\udc00"}', 422, "model"),
        ("/admin/reload", b'{"": null}', 422, '""'),  # found by the fuzz: an empty key named no field
    ]
    for path, raw, status, field in cases:
        r = post_raw(server, path, raw)
        assert r.status_code == status, (raw, r.text)
        assert error_field(status, r.json()) == field and r.json()["error"]["message"], r.text
    assert store.counts() == before
    # a surrogate pair is a real character: served, and stored
    r = post_raw(server, "/v1/generate", b'{"prompt":"\\ud83d\\ude00","max_new_tokens":2,"seed":9223372036854775807,'
                                         b'"temperature":1}')
    assert r.status_code == 200, r.text
    assert store.get_generation(r.json()["generation_id"])["prompt"] == "\U0001f600"


def test_body_size_limit_413_declared_or_chunked(server, store):
    before = store.counts()
    big = json.dumps({"prompt": "p", "comment": "c" * 20000}).encode()
    r = post_raw(server, "/v1/generate", big)
    err = r.json()["error"]
    assert r.status_code == 413 and (err["field"], err["limit"]) == ("body", "serve.max_body_bytes"), r.text
    assert httpx.get(server + "/v1/info").json()["limits"]["max_body_bytes"] == 16384

    def chunks():  # no Content-Length: the limit is counted while reading
        for _ in range(40):
            yield b" " * 1024

    r = httpx.post(server + "/v1/feedback", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["field"] == "body", r.text
    assert store.counts() == before
    assert httpx.post(server + "/v1/generate", json={"prompt": "p", "max_new_tokens": 1}).status_code == 200


def _raw_request(base: str, head: bytes, body: bytes = b"") -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=10)
    s.sendall(head + body)
    return s


def _read_all(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def test_slow_clients_time_out(server):
    """A body that stops arriving is a 408 naming the body; a request head that never ends is closed."""
    t0 = time.monotonic()
    s = _raw_request(server, b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 100\r\n\r\n", b'{"prompt": ')
    with s:
        reply = _read_all(s)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    body = json.loads(reply.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["field"] == "body" and body["error"]["limit"] == "serve.body_timeout_s"
    assert time.monotonic() - t0 < 8

    t0 = time.monotonic()
    s = _raw_request(server, b"POST /v1/generate HTTP/1.1\r\nHost: x\r\n")  # slowloris: the head never ends
    with s:
        assert _read_all(s) == b""  # closed by the server
    assert 0.5 < time.monotonic() - t0 < 8
    assert httpx.get(server + "/health").status_code == 200


@pytest.mark.slow  # 5-35 s: how fast the server fills the socket buffers depends on the machine's load
def test_a_client_that_stops_reading_a_stream_gives_back_its_slot(tmp_path_factory, store):
    """A stream far larger than any socket buffer (~13 MB), never read: its send times out
    (serve.send_timeout_s) and the concurrency slot comes back. Without the timeout it is held for good."""
    from dataclasses import replace

    from lmcore.serve.app import create_app

    params = replace(PARAMS, serve=replace(PARAMS.serve, max_new_tokens=5000))
    model = make_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)
    with thread_server(create_app(str(model), params, store=store, api_token=""), params=params) as base:
        host, port = base.removeprefix("http://").split(":")
        body = json.dumps({"prompt": "hold", "max_new_tokens": 5000, "ignore_eos": True, "stream": True,
                           "logprobs": True, "top_logprobs": 20}).encode()  # ~1 KB an event, ~5 MB in all
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the server's buffers fill
            s.connect((host, int(port)))
            s.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            deadline, seen = time.monotonic() + 60, False
            while time.monotonic() < deadline:
                n = httpx.get(base + "/health").json()["in_flight"]
                seen = seen or n > 0
                if seen and n == 0:
                    break
                time.sleep(0.1)
            assert seen and httpx.get(base + "/health").json()["in_flight"] == 0  # the socket is still open


def test_admin_needs_the_token_when_one_is_set_and_loopback_without(tmp_path_factory, store):
    from lmcore.serve.app import create_app

    model = make_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)
    with thread_server(create_app(str(model), PARAMS, store=store, api_token="s3cret")) as base:
        for headers, status, code in (({}, 401, "missing_token"), ({"Authorization": "Bearer nope"}, 401,
                                                                    "invalid_token"),
                                      ({"Authorization": "Basic s3cret"}, 401, "invalid_token")):
            r = httpx.post(base + "/admin/reload", json={}, headers=headers)
            assert (r.status_code, r.json()["error"]["code"], r.json()["error"]["field"]) == (
                status, code, "Authorization")
        r = httpx.post(base + "/admin/reload", json={}, headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200 and r.json()["ok"]
    with thread_server(create_app(str(model), PARAMS, store=store, api_token="")) as base:
        # without a token admin is loopback-only: a client behind a proxy (X-Forwarded-For) is refused
        r = httpx.post(base + "/admin/reload", json={}, headers={"X-Forwarded-For": "203.0.113.7"})
        assert r.status_code == 403 and r.json()["error"]["field"] == "Authorization"
        assert httpx.post(base + "/admin/reload", json={}).status_code == 200


def test_serve_refuses_to_bind_beyond_loopback_without_a_token(tmp_path):
    """`lmops serve --host 0.0.0.0` without LMOPS_API_TOKEN: a one-line error, exit 1, nothing bound."""
    env = {k: v for k, v in os.environ.items() if k != "LMOPS_API_TOKEN"}
    port = free_port()
    r = subprocess.run([str(Path(sys.executable).with_name("lmops")), "serve", "--host", "0.0.0.0", "--port", str(port),
                        "--model", str(tmp_path)], env={**env, "LMOPS_HOME": str(tmp_path / "home")},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "LMOPS_API_TOKEN" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "serving" not in r.stdout
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)


def test_loopback_rule():
    from lmcore.errors import LmopsError
    from lmcore.serve.limits import is_loopback, require_token_beyond_loopback

    assert all(is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "example.org", "localhost.example.org"))
    require_token_beyond_loopback("127.0.0.1", None)
    require_token_beyond_loopback("0.0.0.0", "t")
    for host in ("0.0.0.0", "::", "192.0.2.1", "example.org"):
        with pytest.raises(LmopsError, match="LMOPS_API_TOKEN"):
            require_token_beyond_loopback(host, "")


def test_a_crashed_decode_loop_fails_its_rows_and_the_next_request_gets_a_fresh_one(tmp_path):
    """Whatever input one day crashes the decode loop fails the rows it held (an error, not a hang), and the
    engine restarts the loop for the next request instead of queueing it forever."""
    import asyncio

    from lmcore.model.generate import SamplingParams
    from lmcore.serve.engine import Engine, Row

    engine = Engine(str(make_model(tmp_path / "tiny")), max_batch=2, max_new_tokens=8, batch_window_ms=0,
                    compiled=False)
    assert engine.reload()["ok"]
    sp = SamplingParams(max_new_tokens=4, temperature=0, stop_at_eos=False)

    async def run(prompt_ids: list[int] | None) -> tuple:
        q: asyncio.Queue = asyncio.Queue()
        row = Row(list(prompt_ids or []), sp, time.monotonic() + 30, asyncio.get_running_loop(), q)
        engine.submit(row, prompt=None if prompt_ids else "ok")
        events = []
        while (ev := await asyncio.wait_for(q.get(), 30))[0] == "token":
            events.append(ev)
        return ev, len(events)

    try:
        last, _ = asyncio.run(run([10**6]))  # a token id past the vocabulary: the prefill raises in the loop
        assert last[0] == "error" and "decode loop" in last[1]
        last, n = asyncio.run(run(None))
        assert last == ("done", "length") and n == 4
        assert engine.health()["decode_restarts"] == 1
    finally:
        engine.stop()
