"""The HTTP API against a real uvicorn server: generate (JSON + SSE), feedback, limits, auth, metrics."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from _serve_helpers import make_model, parse_sse, process_server, thread_server

from lmcore.config import Params, ServeParams

pytestmark = pytest.mark.code


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="module")
def server(model_dir, store):
    from lmcore.serve.app import create_app

    params = Params(serve=ServeParams(compile_decode=False, max_prompt_chars=200, max_new_tokens=48, max_concurrent=16,
                                      poll_interval_s=0))
    with thread_server(create_app(str(model_dir), params, store=store, api_token="")) as base:
        yield base


def test_generate_returns_completion_version_and_timings(server, store):
    r = httpx.post(server + "/v1/generate", json={"prompt": "hello", "max_new_tokens": 12, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] <= 12 and body["finish_reason"] in ("eos", "length")
    assert body["model_version"].startswith("local-") and body["tokens"] is None
    assert body["timings"]["total_ms"] > 0
    row = store.get_generation(body["generation_id"])  # every generation is logged before the 200
    assert row["completion"] == body["completion"] and row["prompt"] == "hello"
    assert row["model_version"] == body["model_version"] and json.loads(row["params"])["temperature"] == 0


def test_seed_is_reproducible_and_logprobs_cover_every_token(server):
    req = {"prompt": "abc", "max_new_tokens": 16, "temperature": 1.0, "seed": 7, "logprobs": True}
    a = httpx.post(server + "/v1/generate", json=req).json()
    b = httpx.post(server + "/v1/generate", json=req).json()
    assert a["completion"] == b["completion"] and a["generation_id"] != b["generation_id"]
    assert len(a["tokens"]) == a["usage"]["completion_tokens"]
    assert all(0.0 < t["prob"] <= 1.0 for t in a["tokens"])


def test_greedy_batched_rows_match_single_sequence_generation(model_dir):
    """The batched decode step computes what Transformer.forward with a KV cache computes."""
    import asyncio

    from lmcore.model.generate import SamplingParams, generate_tokens
    from lmcore.serve.engine import Engine, Row

    engine = Engine(str(model_dir), max_batch=4, max_new_tokens=40, batch_window_ms=20)
    assert engine.reload()["ok"]
    lm = engine.current.lm
    sp = SamplingParams(max_new_tokens=40, temperature=0, stop_at_eos=False)
    prompts = ["x", "hello there", "a prompt longer than the thirty-two token block size of this model"]

    async def one(prompt):
        q: asyncio.Queue = asyncio.Queue()
        engine.submit(Row([], sp, time.monotonic() + 60, asyncio.get_running_loop(), q), prompt=prompt)
        out = []
        while (ev := await q.get())[0] == "token":
            out.append(ev[1])
        return out

    async def all_of():
        return await asyncio.gather(*(one(p) for p in prompts))

    try:
        got = asyncio.run(all_of())
    finally:
        engine.stop()
    for prompt, ids in zip(prompts, got, strict=True):
        ref = [t for t, _ in generate_tokens(lm.model, lm.tokenizer.encode(prompt)[-32:], sp, lm.tokenizer.eos_id)]
        assert ids == ref


def test_stream_sends_start_tokens_and_done(server, store):
    req = {"prompt": "stream me", "max_new_tokens": 10, "stream": True, "logprobs": True, "seed": 3}
    with httpx.stream("POST", server + "/v1/generate", json=req) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = parse_sse(r.read().decode())
    kinds = [k for k, _ in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and set(kinds[1:-1]) <= {"token", "text"}
    done = events[-1][1]
    assert "".join(d["text"] for k, d in events if k in ("token", "text")) == done["completion"]
    assert "".join(t["text"] for t in done["tokens"]) == done["completion"]
    assert all("prob" in d for k, d in events if k == "token")
    assert events[0][1]["generation_id"] == done["generation_id"]
    assert store.get_generation(done["generation_id"]) is not None


def test_concurrent_requests_share_decode_steps(server):
    def one(i):
        return httpx.post(server + "/v1/generate", json={"prompt": f"p{i}", "max_new_tokens": 32}, timeout=60)

    with ThreadPoolExecutor(8) as pool:
        assert all(r.status_code == 200 for r in pool.map(one, range(8)))
    text = httpx.get(server + "/metrics").text
    single = _metric(text, 'lmops_decode_batch_rows_bucket{le="1.0"}')
    total = _metric(text, "lmops_decode_batch_rows_count")
    assert total > single, "no decode step ever held more than one row"


def _metric(text: str, prefix: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def test_feedback_is_stored_and_joined_by_generation_id(server, store):
    gid = httpx.post(server + "/v1/generate", json={"prompt": "rate me", "max_new_tokens": 4}).json()["generation_id"]
    r = httpx.post(server + "/v1/feedback", json={"generation_id": gid, "rating": 1})
    assert r.status_code == 200 and r.json()["feedback_id"] > 0
    r = httpx.post(server + "/v1/feedback", json={"generation_id": gid, "rating": -1, "correction": "better",
                                                   "comment": "meh"})
    assert r.status_code == 200
    rows = store.feedback_for(gid)
    assert [(x["rating"], x["correction"]) for x in rows] == [(1, None), (-1, "better")]


BAD = [
    ("/v1/feedback", b'{"generation_id": "x", "rating": ', 400, "body"),
    ("/v1/feedback", b'{"generation_id": "\xff\xfe", "rating": 1}', 400, "body"),
    ("/v1/feedback", {"generation_id": "never-generated", "rating": 1}, 404, "generation_id"),
    ("/v1/feedback", {"generation_id": "GID", "rating": 2}, 422, "rating"),
    ("/v1/feedback", {"generation_id": "GID", "rating": "up"}, 422, "rating"),
    ("/v1/feedback", {"rating": 1}, 422, "generation_id"),
    ("/v1/feedback", {"generation_id": "GID", "rating": 1, "correction": "c" * 9000}, 413, "correction"),
    ("/v1/feedback", {"generation_id": "GID", "rating": 1, "extra": True}, 422, "extra"),
    ("/v1/generate", {"prompt": "p" * 201}, 413, "prompt"),
    ("/v1/generate", {"prompt": "p", "max_new_tokens": 49}, 422, "max_new_tokens"),
    ("/v1/generate", {"prompt": "p", "temperature": -1}, 422, "temperature"),
    ("/v1/generate", {"max_new_tokens": 4}, 422, "prompt"),
    ("/v1/generate", b"not json", 400, "body"),
]


@pytest.mark.parametrize(("path", "payload", "status", "field"), BAD)
def test_bad_input_is_a_4xx_naming_the_field_and_writes_nothing(server, store, path, payload, status, field):
    gid = httpx.post(server + "/v1/generate", json={"prompt": "x", "max_new_tokens": 2}).json()["generation_id"]
    before = store.counts()
    if isinstance(payload, bytes):
        r = httpx.post(server + path, content=payload, headers={"content-type": "application/json"})
    else:
        payload = {k: (gid if v == "GID" else v) for k, v in payload.items()}
        r = httpx.post(server + path, json=payload)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["field"] == field and err["message"]
    if status == 413 or err["code"] == "over_limit":
        assert err["limit"].startswith(("serve.", "feedback."))
    assert store.counts() == before


def test_health_metrics_and_openapi(server):
    h = httpx.get(server + "/health")
    assert h.status_code == 200 and h.json()["ready"] and h.json()["last_reload_error"] is None
    text = httpx.get(server + "/metrics").text
    version = h.json()["model_version"]
    for needle in ("lmops_requests_total{", "lmops_request_latency_seconds_bucket{", "lmops:generation_tokens_total{",
                   f'lmops_model_info{{name="tiny",version="{version}"}} 1.0'):
        assert needle in text
    spec = httpx.get(server + "/openapi.json").json()
    assert {"/v1/generate", "/v1/feedback", "/health", "/metrics", "/admin/reload"} <= set(spec["paths"])
    gen = spec["components"]["schemas"]["GenerateRequest"]["properties"]
    assert "description" in gen["prompt"] and "logprobs" in gen and "seed" in gen
    assert "rating" in spec["components"]["schemas"]["FeedbackRequest"]["properties"]


def test_playground_page_is_served(server):
    r = httpx.get(server + "/")
    assert r.status_code == 200 and "lmops" in r.text and "/static/app.js" in r.text
    assert httpx.get(server + "/static/app.js").status_code == 200
    assert httpx.get(server + "/static/..%2F..%2Fapp.py").status_code == 404


def test_health_is_503_until_a_model_loads(tmp_path, store):
    from lmcore.serve.app import create_app

    params = Params(serve=ServeParams(compile_decode=False, poll_interval_s=0))
    app = create_app(str(tmp_path / "no-such-model"), params, store=store)
    with thread_server(app, wait=False) as base:
        deadline = time.monotonic() + 30
        while (h := httpx.get(base + "/health")).json()["last_reload_error"] is None and time.monotonic() < deadline:
            assert h.status_code == 503
            time.sleep(0.05)
        assert h.status_code == 503 and "no-such-model" in h.json()["last_reload_error"]
        r = httpx.post(base + "/v1/generate", json={"prompt": "x"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"


def test_ready_means_the_decode_probe_is_done(model_dir, tmp_path):
    """In a fresh home the decode probe (seconds on a busy host) runs before /health says ready, so the
    first request does not pay for it (it once outlasted a client's 5 s read on a loaded test machine)."""
    from lmcore.machine import cache_dir

    home = tmp_path / "home"
    with process_server(model_dir, home):  # its own process: no other server's decode thread chose already
        assert list(cache_dir(home).glob("decode-*.json")), "ready before the decode probe ran"


def test_token_guards_feedback_and_admin_and_concurrency_cap(model_dir, store):
    from lmcore.serve.app import create_app

    params = Params(serve=ServeParams(compile_decode=False, max_concurrent=1, max_new_tokens=5000, poll_interval_s=0))
    app = create_app(str(model_dir), params, store=store, api_token="s3cret")
    with thread_server(app) as base:
        gid = httpx.post(base + "/v1/generate", json={"prompt": "x", "max_new_tokens": 2}).json()["generation_id"]
        fb = {"generation_id": gid, "rating": 1}
        missing = httpx.post(base + "/v1/feedback", json=fb)
        wrong = httpx.post(base + "/v1/feedback", json=fb, headers={"Authorization": "Bearer nope"})
        assert (missing.status_code, wrong.status_code) == (401, 401)
        assert missing.json()["error"]["field"] == wrong.json()["error"]["field"] == "Authorization"
        assert httpx.post(base + "/admin/reload", json={}).status_code == 401
        ok = httpx.post(base + "/v1/feedback", json=fb, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and len(store.feedback_for(gid)) == 1
        assert httpx.get(base + "/v1/info").json()["auth_required"] is True

        # one long stream holds the only slot: the next request is refused with 429
        req = {"prompt": "hold", "max_new_tokens": 5000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", base + "/v1/generate", json=req) as held:
            lines = held.iter_lines()  # keep the iterator alive: dropping it closes the stream
            assert next(lines) == "event: start"  # the slot is taken
            r = httpx.post(base + "/v1/generate", json={"prompt": "x"})
            assert r.status_code == 429 and r.json()["error"]["limit"] == "serve.max_concurrent"
        deadline = time.monotonic() + 30  # the client left mid-stream: the row is cancelled, the slot comes back
        while httpx.get(base + "/health").json()["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(base + "/health").json()["in_flight"] == 0
        assert httpx.post(base + "/v1/generate", json={"prompt": "x", "max_new_tokens": 2}).status_code == 200


def test_request_timeout_stops_generation(model_dir, store):
    from lmcore.serve.app import create_app

    params = Params(serve=ServeParams(compile_decode=False, request_timeout_s=1e-6, poll_interval_s=0))
    with thread_server(create_app(str(model_dir), params, store=store)) as base:
        r = httpx.post(base + "/v1/generate", json={"prompt": "x", "max_new_tokens": 200, "temperature": 0})
        body = r.json()
        assert r.status_code == 200 and body["finish_reason"] == "timeout" and body["usage"]["completion_tokens"] < 200


def test_two_apps_in_one_process_keep_their_own_state(tmp_path, store):
    """The routers are shared modules; engine, limits and token live in each app's own state."""
    from lmcore.serve.app import create_app

    apps = [create_app(str(tmp_path / name), Params(serve=ServeParams(compile_decode=False, max_prompt_chars=chars,
                                                                      poll_interval_s=0)),
                       store=store, api_token=token) for name, chars, token in (("a", 10, "t"), ("b", 20, ""))]
    with thread_server(apps[0], wait=False) as a, thread_server(apps[1], wait=False) as b:
        info_a, info_b = httpx.get(a + "/v1/info").json(), httpx.get(b + "/v1/info").json()
        assert (info_a["auth_required"], info_a["limits"]["max_prompt_chars"]) == (True, 10)
        assert (info_b["auth_required"], info_b["limits"]["max_prompt_chars"]) == (False, 20)
        assert httpx.get(a + "/health").json()["model_source"] == str(tmp_path / "a")
        assert httpx.get(b + "/health").json()["model_source"] == str(tmp_path / "b")
        r = httpx.post(b + "/v1/generate", json={"prompt": "p" * 15})  # under b's limit, over a's
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        r = httpx.post(a + "/v1/generate", json={"prompt": "p" * 15})
        assert r.status_code == 413 and r.json()["error"]["field"] == "prompt"
