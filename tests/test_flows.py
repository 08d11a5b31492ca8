"""The training flow end to end on a tiny corpus, its cache skip, concurrency and failures."""

from __future__ import annotations

import threading

import pytest

pytestmark = [pytest.mark.model, pytest.mark.slow]


def test_training_flow_end_to_end_then_cached(prefect_harness, tiny_workspace):
    from flows.training import training_flow
    from lmcore.registry.models import list_versions, resolve_alias

    first = training_flow(sources=[str(tiny_workspace / "corpus")])
    assert first["model_version"] == "1"
    assert first["gate"]["promoted"] is True
    assert first["steps_trained"] == 12
    assert first["dataset"]["accepted"] > 0
    assert first["dataset"]["accepted"] + first["dataset"]["quarantined"] == first["dataset"]["rows"]
    assert {"val_loss", "perplexity", "bits_per_byte", "accuracy"} <= set(first["metrics"])
    assert resolve_alias("tiny-lm", "champion") == "1"

    # unchanged data and params: no training work, no new version
    second = training_flow(sources=[str(tiny_workspace / "corpus")])
    assert second["cached"] == {"prepare": True, "train": True, "evaluate": True}
    assert second["steps_trained"] == 0
    assert second["model_version"] == "1"
    assert len(list_versions("tiny-lm")) == 1

    # a train.* change retrains and registers a second version, on the same prepared data
    third = training_flow(sources=[str(tiny_workspace / "corpus")], overrides={"train.max_steps": 6})
    assert third["cached"]["prepare"] is True and third["cached"]["train"] is False
    assert third["steps_trained"] == 6
    assert third["model_version"] == "2"


def test_flow_artifacts_are_published(prefect_harness, tiny_workspace):
    import asyncio

    from prefect.client.orchestration import get_client

    from flows.training import training_flow

    state = training_flow(sources=[str(tiny_workspace / "corpus")], return_state=True)
    assert state.is_completed()

    async def artifacts():
        async with get_client() as client:
            from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

            flt = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]))
            return await client.read_artifacts(artifact_filter=flt)

    found = {a.key: a for a in asyncio.run(artifacts())}
    assert {"training-summary", "training-metrics"} <= set(found)
    assert "Dataset version" in found["training-summary"].data


def test_two_runs_at_once_register_once(prefect_harness, tiny_workspace):
    from flows.training import training_flow
    from lmcore.registry.models import list_versions

    results, errors = [], []

    def go():
        try:
            results.append(training_flow(sources=[str(tiny_workspace / "corpus")]))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert {r["model_version"] for r in results} == {"1"}
    assert len(list_versions("tiny-lm")) == 1
    assert sum(r["steps_trained"] for r in results) == 12  # trained once, the other waited and reused it


def test_missing_source_fails_fast_with_one_line(prefect_harness, tiny_workspace):
    from flows.training import training_flow
    from lmcore.errors import LmopsError

    state = training_flow(sources=[str(tiny_workspace / "nope")], return_state=True)
    assert state.is_failed()
    with pytest.raises(LmopsError, match="nope"):
        state.result()


def test_bad_params_fail_the_run_with_the_message(prefect_harness, tiny_workspace):
    from flows.training import training_flow
    from lmcore.errors import LmopsError

    state = training_flow(overrides={"train.lr": -1.0}, return_state=True)
    assert state.is_failed()
    assert "train.lr must be > 0" in state.message
    with pytest.raises(LmopsError, match="train.lr must be > 0"):
        state.result()


def test_optimize_flow_sweeps_and_applies(prefect_harness, tiny_workspace):
    from flows.optimize import optimize_flow
    from lmcore.config import load_params

    params_file = tiny_workspace / "params.yaml"
    params_file.write_text(
        params_file.read_text()
        + "optimize:\n  trials: 2\n  trial_max_steps: 6\n  trial_eval_interval: 3\n"
        + "  search_space:\n    lr: {low: 1.0e-4, high: 1.0e-2, log: true}  # searched\n"
    )
    before = load_params(params_file).train.lr
    result = optimize_flow(params_path=str(params_file), data=str(tiny_workspace / "corpus"), apply=True)
    assert result["trials_run"] == 2
    assert result["best_value"] is not None and "train.lr" in result["best_params"]
    after = load_params(params_file)
    assert after.train.lr == pytest.approx(result["best_params"]["train.lr"])
    assert after.train.lr != before
    assert "# searched" in params_file.read_text()  # comments survive --apply


def test_tracking_server_down_fails_the_run_with_the_uri(prefect_harness, tiny_workspace, monkeypatch):
    from flows.training import training_flow
    from lmcore.errors import LmopsError
    from lmcore.services import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    monkeypatch.setenv("LMOPS_MLFLOW_RETRIES", "1")
    monkeypatch.setenv("LMOPS_MLFLOW_BACKOFF", "0.1")
    state = training_flow(sources=[str(tiny_workspace / "corpus")], return_state=True)
    assert state.is_failed()
    assert f"unreachable at {dead}" in state.message
    with pytest.raises(LmopsError, match="unreachable"):
        state.result()


def test_lmops_run_prints_one_line_for_a_missing_source(tiny_workspace, tmp_path):
    """The console entry point: a failed flow is one `error:` line, never a traceback."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--source", str(tiny_workspace / "missing-folder")],
        cwd=tiny_workspace, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "missing-folder" in errors[0], proc.stderr


def test_harvest_flow_closes_the_loop(prefect_harness, tiny_workspace):
    """Feedback rows -> a validated `feedback` dataset version -> a triggered training run on it."""
    from flows.harvest import harvest_flow
    from flows.training import training_flow
    from lmcore.data.versions import DataRegistry
    from lmcore.feedback.store import FeedbackStore
    from lmcore.settings import get_settings

    first = training_flow(sources=[str(tiny_workspace / "corpus")])
    params_file = tiny_workspace / "params.yaml"
    params_file.write_text(params_file.read_text() + "feedback:\n  min_new_records: 5\n  holdout_fraction: 0.2\n")

    store = FeedbackStore(get_settings().feedback_db)
    for i in range(8):
        gid = f"gen{i:04d}"
        store.log_generation(id=gid, model_version="1", prompt=f"def f{i}(x):\n", completion="    return x\n",
                             params={}, latency_ms=1, prompt_tokens=1, completion_tokens=1)
        store.add_feedback(gid, 1 if i % 2 else -1, correction=None if i % 2 else f"    return x + {i}\n")
    store.close()

    result = harvest_flow(params_path=str(params_file))
    assert result["new_rows"] == 8 and result["quarantined"] == 0
    assert result["should_train"] is True
    assert result["training"]["model_version"] == "2"  # retrained on the new dataset version
    current = DataRegistry.open().current()
    assert current.id != first["dataset"]["version"] and current.kind == "feedback"

    again = harvest_flow(params_path=str(params_file))  # nothing new: no version, no training
    assert again["new_rows"] == 0 and again["training"] is None
