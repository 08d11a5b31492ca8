"""Monitoring: the drift test on same-distribution and shifted prompts, ratings and latency per version,
the monitor flow's trigger in a real Prefect engine, and the playground's /monitor page over HTTP."""

from __future__ import annotations

import dataclasses
import json
import random
import re
import time
from pathlib import Path

import httpx
import pytest
from _registry_helpers import corpus_text

from lmcore.config import MonitorParams, load_params
from lmcore.errors import LmopsError
from lmcore.feedback.monitor import (
    build_report,
    load_history,
    prompt_drift,
    reference_windows,
    report_markdown,
    report_metrics,
    save_report,
    version_stats,
)
from lmcore.feedback.store import FeedbackStore

ROOT = Path(__file__).resolve().parents[1]
CFG = MonitorParams(min_prompts=20, max_prompts=60)


@pytest.fixture(scope="module")
def stdlib_halves():
    """Two disjoint halves of (a slice of) the built-in corpus, split at random by record."""
    from lmcore.data.sources import stdlib_records

    records = [t for t, _, _ in stdlib_records(2000, 600)]
    random.Random(0).shuffle(records)
    return records[:300], records[300:]


def _lengths(n: int) -> list[int]:
    return [(20, 40, 80, 160)[i % 4] for i in range(n)]


def _prose_prompts(n: int, seed: int) -> list[str]:
    text = corpus_text()
    return reference_windows([text[i:i + 2000] for i in range(0, len(text), 2000)], _lengths(n), seed)


def _stdlib_prompts(texts: list[str], n: int, seed: int) -> list[str]:
    return reference_windows(texts, _lengths(n), seed)


@pytest.mark.code
def test_same_distribution_passes_and_shifted_prompts_are_flagged(stdlib_halves):
    train, held_out = stdlib_halves
    same = prompt_drift(_stdlib_prompts(held_out, 60, seed=1), train, CFG)
    assert not same.drifted and same.p_value > CFG.alpha and same.divergence < same.threshold
    assert same.n_prompts >= 50 and same.n_reference == 2 * same.n_prompts  # windows under 3 chars are dropped
    shifted = prompt_drift(_prose_prompts(60, seed=2), train, CFG)
    assert shifted.drifted and shifted.p_value <= CFG.alpha and shifted.divergence > shifted.threshold
    assert "permutation" in shifted.method
    again = prompt_drift(_prose_prompts(60, seed=2), train, CFG)  # seeded: the same data, the same verdict
    assert dataclasses.astuple(again) == dataclasses.astuple(shifted)


@pytest.mark.code
def test_false_alarm_rate_is_near_alpha(stdlib_halves):
    """The calibration itself, small: 40 same-distribution trials at alpha 0.05 flag few (expected 2)."""
    train, held_out = stdlib_halves
    cfg = dataclasses.replace(CFG, alpha=0.05, permutations=99)
    flagged = sum(prompt_drift(_stdlib_prompts(held_out, 30, seed=100 + t), train,
                               dataclasses.replace(cfg, seed=t)).drifted for t in range(40))
    assert flagged <= 6  # P(>= 7 of 40 at 5%) < 0.5%; a miscalibrated test (n-gram-level shuffles) flags most


@pytest.mark.code
def test_too_few_prompts_or_no_reference_is_not_tested(stdlib_halves):
    train, _ = stdlib_halves
    few = prompt_drift(_prose_prompts(5, seed=3) + ["", "ab"], train, CFG)
    assert few.p_value is None and not few.drifted and "fewer than monitor.min_prompts=20" in few.note
    none = prompt_drift(_prose_prompts(30, seed=3), [], CFG, "model 'x' has no version with alias 'champion'")
    assert none.p_value is None and not none.drifted and "no version with alias" in none.note


@pytest.mark.code
@pytest.mark.parametrize("key,value,message", [
    ("monitor.alpha", 1.5, "monitor.alpha must be within (0, 1)"),
    ("monitor.permutations", 10, "monitor.permutations must be >= 1/alpha - 1"),
    ("monitor.min_prompts", 0, "monitor.min_prompts must be within"),
    ("monitor.trigger", "yes", "monitor.trigger must be true or false"),
])
def test_bad_monitor_params_are_one_line_errors(key, value, message):
    with pytest.raises(LmopsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_params(ROOT / "params.yaml", {key: value})


def _log(store: FeedbackStore, gid: str, version: str, prompt: str, latency_ms: float, tokens: int = 10) -> None:
    store.log_generation(id=gid, model_version=version, prompt=prompt, completion="x", params={},
                         latency_ms=latency_ms, prompt_tokens=3, completion_tokens=tokens)


@pytest.fixture()
def rated_store(tmp_path):
    """v1: 10 generations (latency 10..100 ms), 4 ratings, 1 down; v2: 30 generations, 25 ratings, 15 down, 5
    corrected; plus one generation from before the window."""
    store = FeedbackStore(f"sqlite:///{tmp_path / 'fb.db'}")
    for i in range(10):
        _log(store, f"a{i}", "1", f"def f{i}(", latency_ms=10.0 * (i + 1))
    for i, rating in enumerate([1, 1, 1, -1]):
        store.add_feedback(f"a{i}", rating)
    for i in range(30):
        _log(store, f"b{i}", "2", f"import m{i}", latency_ms=200.0)
    for i in range(25):
        store.add_feedback(f"b{i}", -1 if i < 15 else 1, correction=f"fixed {i}" if i < 5 else None)
    with store.engine.begin() as conn:  # one generation from two days ago: outside the window
        conn.execute(store.generations.insert().values(
            id="old", created_at=time.time() - 48 * 3600, model_version="1", prompt="old", completion="", params="{}",
            latency_ms=9999.0, prompt_tokens=1, completion_tokens=1))
    yield store
    store.close()


@pytest.mark.data
def test_ratings_and_latency_per_version_and_the_rating_trigger(rated_store, tmp_path):
    stats = {s.version: s for s in version_stats(rated_store, time.time() - 24 * 3600)}
    v1, v2 = stats["1"], stats["2"]
    assert (v1.generations, v1.ratings, v1.thumbs_down, v1.corrections) == (10, 4, 1, 0)
    assert v1.thumbs_down_rate == 0.25 and v1.correction_rate == 0.0
    assert v1.latency_ms["p50"] == pytest.approx(55.0) and v1.latency_ms["p99"] == pytest.approx(99.1)
    assert v1.ms_per_token == pytest.approx(5.5)
    assert (v2.ratings, v2.thumbs_down, v2.corrections) == (25, 15, 5) and v2.thumbs_down_rate == 0.6
    assert v2.correction_rate == 0.2

    cfg = dataclasses.replace(CFG, min_ratings=20, max_thumbs_down_rate=0.5)
    report = build_report(rated_store, [], cfg, model_name="m", champion="2", dataset_version=None,
                          reference_note="no champion data").to_dict()
    assert len(report["triggers"]) == 1 and "thumbs-down rate of champion v2 is 60%" in report["triggers"][0]
    assert report["drift"]["p_value"] is None  # 40 prompts but no reference text: not tested, no trigger
    metrics = report_metrics(report)
    assert metrics["v2_thumbs_down_rate"] == 0.6 and metrics["triggered"] == 1.0 and "drift_p_value" not in metrics
    assert "| v2 (champion) | 30 | 25 | 60.0% | 20.0% |" in report_markdown(report)
    quiet = build_report(rated_store, [], cfg, model_name="m", champion="1", dataset_version=None).to_dict()
    assert quiet["triggers"] == []  # v1: 4 ratings, under min_ratings

    save_report(report, tmp_path)
    with (tmp_path / "monitor" / "history.jsonl").open("a") as f:
        f.write('{not json\n{}\n[1]\n{"at": 1, "drift": 2}\n')
    save_report(quiet, tmp_path)
    assert [r["champion"] for r in load_history(tmp_path)] == ["2", "1"]  # lines that are not reports are skipped


@pytest.mark.model
def test_monitor_page_renders_charts_over_http(rated_store, tmp_path):
    from _serve_helpers import make_model, thread_server

    from lmcore.config import Params, ServeParams
    from lmcore.serve.app import create_app
    from lmcore.settings import Settings

    settings = Settings(workspace=tmp_path, home=tmp_path / "home")
    report = build_report(rated_store, [], CFG, model_name="m", champion="2", dataset_version="abc").to_dict()
    report["drift"].update(divergence=0.05, threshold=0.02, p_value=0.004, drifted=True)
    save_report(report, settings.home)
    params = Params(serve=ServeParams(compile_decode=False))
    app = create_app(str(make_model(tmp_path / "model")), params, settings, store=rated_store)
    with thread_server(app) as base:
        r = httpx.get(f"{base}/monitor", timeout=60)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        page = r.text
        assert page.count("<svg") == 3 and not re.search(r'(src|href)="(https?:)?//', page)  # nothing fetched
        assert "<td>v2</td><td>30</td><td>25</td><td>60.0%</td><td>20.0%</td>" in page
        assert "DRIFT: divergence 0.0500" in page
        assert "/monitor" in httpx.get(f"{base}/", timeout=10).text  # linked from the playground
        assert "/monitor" not in json.dumps(httpx.get(f"{base}/openapi.json", timeout=10).json()["paths"])


def _trigger_runs() -> list:
    """Flow runs tagged as started by the monitor's trigger (the Prefect API the harness serves)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    from flows.monitor import TRIGGER_TAG

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[TRIGGER_TAG])))


def _trigger_events(deadline_s: float) -> list:
    """The monitor's trigger events, waiting up to ``deadline_s`` (events are sent in the background)."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter

    from flows.monitor import TRIGGER_EVENT

    deadline = time.monotonic() + deadline_s
    with get_client(sync_client=True) as client:
        while True:
            events = client.read_events(EventFilter(event=EventNameFilter(name=[TRIGGER_EVENT])), limit=50).events
            if events or time.monotonic() > deadline:
                return events
            time.sleep(0.5)


@pytest.mark.model
@pytest.mark.slow
def test_monitor_flow_fires_on_drift_and_not_on_same_distribution(prefect_harness, tiny_workspace):
    """Champion v1 trained on the tiny corpus; prompts like it -> no trigger; English prose -> drift flagged,
    the trigger event emitted, harvest and training run as tagged subflows; artifacts and MLflow metrics."""
    from conftest import TINY_TEXTS
    from mlflow import MlflowClient
    from prefect.events.worker import EventsWorker

    from flows.monitor import monitor_flow
    from flows.training import training_flow
    from lmcore.registry.tracking import configure_mlflow
    from lmcore.settings import get_settings

    params_file = tiny_workspace / "params.yaml"
    params_file.write_text(params_file.read_text() + "monitor:\n  min_prompts: 20\n  max_prompts: 40\n")
    assert training_flow(sources=[str(tiny_workspace / "corpus")])["model_version"] == "1"
    store = FeedbackStore(get_settings().feedback_db)
    for i, p in enumerate(reference_windows(list(TINY_TEXTS.values()), [16, 32, 64] * 13 + [16], seed=5)):
        _log(store, f"same{i}", "1", p, latency_ms=20.0)

    quiet = monitor_flow(params_path=str(params_file))
    d = quiet["report"]["drift"]
    assert d["n_prompts"] == 40 and not d["drifted"] and d["p_value"] > d["alpha"], d
    assert quiet["report"]["dataset_version"] and quiet["report"]["champion"] == "1"
    assert quiet["triggered"] is False and quiet["training"] is None and _trigger_runs() == []

    for i, p in enumerate(_prose_prompts(40, seed=6)):  # the 40 newest prompts: English prose
        _log(store, f"prose{i}", "1", p, latency_ms=30.0)
    store.close()
    fired = monitor_flow(params_path=str(params_file))
    d = fired["report"]["drift"]
    assert d["drifted"] and d["p_value"] <= d["alpha"] and fired["report"]["triggers"][0].startswith("prompt drift")
    assert fired["triggered"] is True and fired["harvest"]["new_rows"] == 0
    assert fired["training"]["model_version"] == "1"  # no new data: a cached run, no training work
    runs = {r.name: r for r in _trigger_runs()}
    assert set(runs) == {"harvest (monitor: drift)", "training (monitor: drift)"}
    assert all(r.state.is_completed() and "monitor-drift" in r.tags for r in runs.values())
    EventsWorker.drain_all(timeout=10)
    events = _trigger_events(deadline_s=15)
    assert len(events) == 1 and events[0].payload["triggers"] == fired["report"]["triggers"]
    assert events[0].resource.id == "lmops.model.tiny-lm"

    configure_mlflow()
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("tiny-monitor").experiment_id])
    assert sorted(r.data.metrics["drift_flag"] for r in runs) == [0.0, 1.0]
    assert len(load_history(get_settings().home)) == 2
