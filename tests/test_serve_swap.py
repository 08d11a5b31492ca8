"""Hot swap: a new version loads beside the old one; in-flight requests finish on the old model;
a version that fails to load leaves the old one serving; the champion alias is followed."""

from __future__ import annotations

import os
import time

import httpx
import pytest
from _serve_helpers import make_model, parse_sse, thread_server

from lmcore.config import Params, ServeParams
from lmcore.feedback.store import FeedbackStore

pytestmark = pytest.mark.model


@pytest.fixture()
def store(tmp_path):
    s = FeedbackStore(f"sqlite:///{tmp_path / 'fb.db'}")
    yield s
    s.close()


def test_reload_swaps_atomically_and_a_corrupt_version_changes_nothing(tmp_path, store):
    from lmcore.serve.app import create_app

    a, b = make_model(tmp_path / "a", seed=1), make_model(tmp_path / "b", seed=2)
    bad = make_model(tmp_path / "bad", seed=3)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated weights
    params = Params(serve=ServeParams(compile_decode=False, max_new_tokens=3000, poll_interval_s=0))
    with thread_server(create_app(str(a), params, store=store)) as base:
        v_a = httpx.get(base + "/health").json()["model_version"]
        req = {"prompt": "old", "max_new_tokens": 400, "ignore_eos": True, "stream": True, "temperature": 0}
        with httpx.stream("POST", base + "/v1/generate", json=req, timeout=60) as held:
            lines = held.iter_lines()
            assert next(lines) == "event: start"
            r = httpx.post(base + "/admin/reload", json={"model": str(b)}, timeout=60)  # while A decodes
            assert r.status_code == 200 and r.json()["swapped"] and r.json()["previous"] == v_a
            v_b = r.json()["version"]
            new = httpx.post(base + "/v1/generate", json={"prompt": "new", "max_new_tokens": 4}).json()
            assert new["model_version"] == v_b != v_a
            events = parse_sse("\n".join(["event: start", *lines]))
        done = events[-1][1]
        assert events[-1][0] == "done" and done["model_version"] == v_a  # finished on the old model
        assert done["usage"]["completion_tokens"] == 400

        r = httpx.post(base + "/admin/reload", json={"model": str(bad)}, timeout=60)
        assert r.status_code == 422 and r.json()["ok"] is False and "model.safetensors" in r.json()["error"]
        h = httpx.get(base + "/health").json()
        assert h["ready"] and h["model_version"] == v_b and "bad" in h["last_reload_error"]
        ok = httpx.post(base + "/v1/generate", json={"prompt": "still", "max_new_tokens": 3})
        assert ok.status_code == 200 and ok.json()["model_version"] == v_b
        metrics = httpx.get(base + "/metrics").text
        info = [line for line in metrics.splitlines() if line.startswith("lmops_model_info{")]
        assert len(info) == 1 and f'version="{v_b}"' in info[0]  # counters keep the old version's label
        assert f'lmops:e2e_request_latency_seconds_count{{model_name="b",model_version="{v_b}"}}' in metrics
        assert f'model_version="{v_a}"' in metrics
        assert 'lmops_reloads_total{result="failed"} 1.0' in metrics
        deadline = time.monotonic() + 30  # the old batcher stops once drained
        while httpx.get(base + "/health").json()["retired_draining"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(base + "/health").json()["retired_draining"] == 0


@pytest.mark.slow
def test_serves_the_registry_champion_and_follows_the_alias(tmp_path_factory, store):
    """Through the real MLflow registry: reload on POST /admin/reload and by polling resolve_alias."""
    from _registry_helpers import make_home

    from lmcore.registry.models import log_model, promote, register_version
    from lmcore.registry.tracking import RunTracker, lineage_tags
    from lmcore.serve.app import create_app

    base_dir = tmp_path_factory.mktemp("swapreg")
    old_home = os.environ.get("LMOPS_HOME")
    make_home(base_dir / "home", tmp_path_factory.getbasetemp())
    try:
        def register(folder):
            tags = lineage_tags("testdata", "abc123", "ph", None, "cpu")
            tracker = RunTracker.start("lmops-test", "train", {"x": 1}, tags, system_metrics=False)
            uri = log_model(tracker, folder)
            tracker.finish()
            return register_version(uri, "served-lm", tags, tracker.run_id)

        v1 = register(make_model(base_dir / "m1", seed=1))
        v2 = register(make_model(base_dir / "m2", seed=2))
        v3 = register(make_model(base_dir / "m3", seed=3))
        promote("served-lm", v1, "first")
        params = Params(serve=ServeParams(compile_decode=False, poll_interval_s=0.3))
        with thread_server(create_app("models:/served-lm@champion", params, store=store)) as base:
            h = httpx.get(base + "/health").json()
            assert (h["model_name"], h["model_version"]) == ("served-lm", v1)
            promote("served-lm", v2, "deploy step")
            r = httpx.post(base + "/admin/reload", json={}, timeout=60)  # loopback, no token configured
            assert r.status_code == 200 and r.json()["version"] == v2  # (the poller may have swapped first)
            promote("served-lm", v3, "moved without telling the server")
            deadline = time.monotonic() + 60
            while httpx.get(base + "/health").json()["model_version"] != v3 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert httpx.post(base + "/v1/generate", json={"prompt": "x", "max_new_tokens": 2}).json()[
                "model_version"] == v3
    finally:
        if old_home is not None:
            os.environ["LMOPS_HOME"] = old_home
