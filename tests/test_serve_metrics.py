"""``/metrics`` in vLLM's shape, scraped from a real server after real requests, across a hot swap."""

from __future__ import annotations

import re
import time

import httpx
import pytest
from _serve_helpers import make_model, thread_server

from lmcore.config import Params, ServeParams
from lmcore.feedback.store import FeedbackStore

pytestmark = pytest.mark.code

SERIES = ("lmops:time_to_first_token_seconds_count", "lmops:time_per_output_token_seconds_count",
          "lmops:e2e_request_latency_seconds_count", "lmops:request_queue_time_seconds_count",
          "lmops:prompt_tokens_total", "lmops:generation_tokens_total", "lmops:request_success_total",
          "lmops:num_requests_running", "lmops:num_requests_waiting")
LINE = re.compile(r'^(?P<name>[a-zA-Z_:][\w:]*)\{(?P<labels>[^}]*)\} (?P<value>\S+)$')


def scrape(base: str) -> list[tuple[str, dict, float]]:
    out = []
    for line in httpx.get(base + "/metrics").text.splitlines():
        if m := LINE.match(line):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m["labels"]))
            out.append((m["name"], labels, float(m["value"])))
    return out


def total(samples, name: str, **labels) -> float:
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items()))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from lmcore.serve.app import create_app

    d = tmp_path_factory.mktemp("metrics")
    models = make_model(d / "tiny", seed=0), make_model(d / "tiny-b", seed=1)
    store = FeedbackStore(f"sqlite:///{d / 'feedback.db'}")
    params = Params(serve=ServeParams(max_new_tokens=4000, poll_interval_s=0, compile_decode=False))
    with thread_server(create_app(str(models[0]), params, store=store, api_token="")) as base:
        yield base, models
    store.close()


def test_series_follow_requests_feedback_and_a_hot_swap(setup):
    base, models = setup
    version = httpx.get(base + "/health").json()["model_version"]
    bodies = [httpx.post(base + "/v1/generate", json={"prompt": f"p{i}", "max_new_tokens": 3 + i, "seed": i,
                                                      "ignore_eos": True}, timeout=60).json() for i in range(3)]
    with httpx.stream("POST", base + "/v1/generate", timeout=60,
                      json={"prompt": "s", "max_new_tokens": 4, "ignore_eos": True, "stream": True}) as r:
        r.read()
    # the OpenAI route: two choices are two generations, each counted once (by the engine, not the route)
    oa = httpx.post(base + "/v1/completions", timeout=60, json={"model": "tiny", "prompt": "o", "max_tokens": 2,
                                                                "n": 2, "ignore_eos": True}).json()
    assert oa["usage"]["completion_tokens"] == 4
    for gid, rating in ((bodies[0]["generation_id"], 1), (bodies[1]["generation_id"], -1),
                        (oa["id"], -1)):
        assert httpx.post(base + "/v1/feedback", json={"generation_id": gid, "rating": rating}).status_code == 200

    s = scrape(base)
    lab = {"model_name": "tiny", "model_version": version}
    for name in SERIES:  # every series exists with both labels
        assert any(n == name and lab.items() <= labels.items() for n, labels, _ in s), name
    new_tokens = [b["usage"]["completion_tokens"] for b in bodies] + [4, 2, 2]  # + the stream, the 2 choices
    assert new_tokens[:3] == [3, 4, 5]  # ignore_eos: exactly max_new_tokens each
    assert total(s, "lmops:generation_tokens_total", **lab) == sum(new_tokens)
    prompts = sum(b["usage"]["prompt_tokens"] for b in bodies) + 1 + 2 * oa["usage"]["prompt_tokens"]
    assert total(s, "lmops:prompt_tokens_total", **lab) == prompts
    assert total(s, "lmops:time_to_first_token_seconds_count", **lab) == 6
    assert total(s, "lmops:time_per_output_token_seconds_count", **lab) == sum(n - 1 for n in new_tokens)
    assert total(s, "lmops:e2e_request_latency_seconds_count", **lab) == 6
    assert total(s, "lmops:request_queue_time_seconds_count", **lab) == 6
    assert total(s, "lmops:request_success_total", finished_reason="length", **lab) == 6
    assert total(s, "lmops:feedback_total", rating="1", **lab) == 1
    assert total(s, "lmops:feedback_total", rating="-1", **lab) == 2
    e2e_sum = total(s, "lmops:e2e_request_latency_seconds_sum", **lab)
    ttft_sum = total(s, "lmops:time_to_first_token_seconds_sum", **lab)
    assert 0 < ttft_sum <= e2e_sum  # the first token comes before the last
    assert total(s, "lmops:num_requests_running", **lab) == 0

    # a long stream holds a slot: the running gauge counts it while it decodes
    req = {"prompt": "hold", "max_new_tokens": 4000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", base + "/v1/generate", json=req, timeout=60) as held:
        lines = held.iter_lines()
        assert next(lines) == "event: start"
        assert "event: token" in lines  # the row is decoding
        assert total(scrape(base), "lmops:num_requests_running", **lab) == 1

    # hot swap: new requests are labelled with the new version, the old version's counts stay
    swap = httpx.post(base + "/admin/reload", json={"model": str(models[1])}, timeout=60).json()
    assert swap["swapped"] and swap["version"] != version
    httpx.post(base + "/v1/generate", json={"prompt": "after", "max_new_tokens": 2, "ignore_eos": True}, timeout=60)
    s = scrape(base)
    new = {"model_name": "tiny-b", "model_version": swap["version"]}
    assert total(s, "lmops:generation_tokens_total", **new) == 2
    assert total(s, "lmops:e2e_request_latency_seconds_count", **new) == 1
    assert total(s, "lmops:generation_tokens_total", **lab) >= sum(new_tokens)
    deadline = time.monotonic() + 30  # the old batcher drains, then its gauges disappear
    while any(n == "lmops:num_requests_running" and labels.get("model_version") == version
              for n, labels, _ in scrape(base)) and time.monotonic() < deadline:
        time.sleep(0.05)
    gauges = {labels["model_version"] for n, labels, _ in scrape(base) if n == "lmops:num_requests_running"}
    assert gauges == {swap["version"]}


def test_grafana_dashboard_queries_only_exported_series(setup, root):
    """Every series the dashboard plots is one the server exports (a renamed metric breaks this test)."""
    import json

    base, _ = setup
    exported = {n for n, _, _ in scrape(base)}
    dash = json.loads((root / "deploy" / "grafana" / "lmops-serving.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    used = {m for e in exprs for m in re.findall(r"lmops:[a-z0-9_]+", e)}
    assert len(used) >= 10 and used <= exported, used - exported
    assert all("model_version" in e for e in exprs if "lmops:" in e)
