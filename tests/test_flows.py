"""The training flow end to end on a tiny corpus, its cache skip, concurrency and failures."""

from __future__ import annotations

import threading

import pytest

pytestmark = [pytest.mark.model, pytest.mark.slow]


def test_training_flow_end_to_end_then_cached(prefect_harness, tiny_workspace):
    from lmcore.registry import list_versions, resolve_alias

    from flows.training import training_flow

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
    from lmcore.registry import list_versions

    from flows.training import training_flow

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
