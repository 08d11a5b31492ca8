"""MLflow tracking against a real sqlite store: params, batched metrics, artifacts, lineage, threads, errors."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from _registry_helpers import make_home, prepared_data, tiny_params, trained_model

from lmcore.errors import LmopsError


@pytest.fixture()
def home(tmp_path, tmp_path_factory):
    old = os.environ.get("LMOPS_HOME")
    yield make_home(tmp_path / "home", tmp_path_factory.getbasetemp())
    if old is not None:
        os.environ["LMOPS_HOME"] = old


@pytest.mark.model
def test_training_run_is_fully_tracked(home, tmp_path):
    import mlflow
    import torch

    from lmcore.registry.reports import log_training_outputs
    from lmcore.registry.tracking import LINEAGE_KEYS, RunTracker, lineage_tags
    from lmcore.training.evaluate import evaluate

    torch.set_num_threads(1)
    params = tiny_params(max_steps=30, eval_interval=10)
    data = prepared_data(tmp_path / "data")
    tags = lineage_tags("testdata", "abc123", params.slice_hash("model", "train"), "flow-1", "cpu")
    tracker = RunTracker.start("lmops-test", "train", params.flat(), tags)
    tracker.flush_every = 7  # force several background batches
    result = trained_model(data, tmp_path / "run", on_metrics=tracker.log_metrics, max_steps=30, eval_interval=10)
    tracker.log_dataset_input(type("V", (), {"id": "abc123", "git_rev": "deadbeef"})(), "data/corpus")
    metrics = evaluate(result.model_dir, data, params.eval, device="cpu")
    log_training_outputs(tracker, model_dir=result.model_dir, metrics=metrics, history_csv=result.history_csv,
                         params=params, dataset_version="abc123", lineage=tags)
    tracker.finish()
    assert mlflow.active_run() is None  # never the fluent, thread-local run

    client = tracker.client
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == "30" and run.data.params["eval.prompts"].startswith("[")
    assert len(run.data.params) == len(params.flat())
    for key in LINEAGE_KEYS:
        assert key in run.data.tags
    assert run.data.tags["lmops.flow_run_id"] == "flow-1" and run.data.tags["lmops.dataset_version"] == "testdata"
    assert run.data.tags["lmops.code_rev"] != ""
    steps = [m.step for m in client.get_metric_history(tracker.run_id, "train_loss")]
    assert steps == sorted(steps) and len(steps) >= 3 and steps[-1] == 30
    assert {"lr", "tokens_per_s", "val_loss", "eval/bits_per_byte", "eval/perplexity", "eval/accuracy"} <= set(
        run.data.metrics)
    ds = run.inputs.dataset_inputs[0]
    assert ds.dataset.source_type == "dvc" and "dvc://data/corpus@deadbeef" in ds.dataset.source
    files = {f.path for f in client.list_artifacts(tracker.run_id)}
    files |= {f.path for d in ("eval", "plots", "tokenizer") for f in client.list_artifacts(tracker.run_id, d)}
    assert {"model_card.md", "plots/loss_curve.png", "eval/samples.md", "eval/metrics.json",
            "eval/completions.json", "tokenizer/tokenizer.json"} <= files
    png = client.download_artifacts(tracker.run_id, "plots/loss_curve.png", str(tmp_path / "dl"))
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = Path(client.download_artifacts(tracker.run_id, "model_card.md", str(tmp_path / "dl"))).read_text()
    assert "parameters:" in card and "abc123" in card and "Limitations" in card and "bits_per_byte" in card


@pytest.mark.code
def test_trackers_in_threads_use_their_own_runs(home):
    from lmcore.registry.tracking import RunTracker

    trackers: list[RunTracker] = []
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            t = RunTracker.start("lmops-threads", f"t{i}", {"i": i}, {}, system_metrics=False)
            for step in range(120):
                t.log_metrics(step, {"x": float(i * 1000 + step)})
            t.finish()
            trackers.append(t)
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not errors, errors
    for t in trackers:
        i = int(t.client.get_run(t.run_id).data.params["i"])
        hist = t.client.get_metric_history(t.run_id, "x")
        assert len(hist) == 120 and {int(m.value) // 1000 for m in hist} == {i}


@pytest.mark.code
def test_nonfinite_summary_metrics_become_tags(home):
    from lmcore.registry.tracking import RunTracker

    t = RunTracker.start("lmops-test", "nan", {}, {}, system_metrics=False)
    t.log_summary({"loss": float("nan"), "acc": 0.5}, prefix="eval/")
    t.finish()
    run = t.client.get_run(t.run_id)
    assert run.data.metrics == {"eval/acc": 0.5} and run.data.tags["lmops.nonfinite.eval/loss"] == "nan"


@pytest.mark.code
def test_unreachable_tracking_server_is_one_line_error(home, monkeypatch, capsys):
    from lmcore.registry.tracking import configure_mlflow
    from lmcore.services import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("LMOPS_MLFLOW_RETRIES", "2")
    monkeypatch.setenv("LMOPS_MLFLOW_BACKOFF", "0.01")
    with pytest.raises(LmopsError, match=f"MLflow tracking server unreachable at {uri}") as exc:
        configure_mlflow()
    assert "after 3 attempts" in str(exc.value) and "\n" not in str(exc.value)
    from lmcore.cli import main

    with pytest.raises(SystemExit) as code:
        main(["models", "--name", "x"])
    err = capsys.readouterr().err.strip()
    assert code.value.code == 1 and err.startswith(f"error: MLflow tracking server unreachable at {uri}")
    assert len(err.splitlines()) == 1


@pytest.mark.code
def test_loss_curve_png(tmp_path):
    from lmcore.plots import read_history, save_loss_curve

    csv = tmp_path / "history.csv"
    csv.write_text("step,train_loss,val_loss,lr,tokens_per_s\n1,5.0,,0.1,10\n2,4.0,4.5,0.1,10\n3,3.5,,0.1,10\n")
    assert read_history(csv)[1]["val_loss"] == 4.5 and read_history(csv)[0]["val_loss"] is None
    out = save_loss_curve(csv, tmp_path / "plots" / "loss.png")
    assert out.read_bytes()[:4] == b"\x89PNG" and out.stat().st_size > 1000
