"""The `monitor` flow: prompt drift, ratings and latency of what the server answered, and retraining
when a threshold is crossed.

One pass (``lmcore.feedback.monitor.run_monitor``) is published as Prefect artifacts
(``monitor-report``, ``monitor-versions``) and as an MLflow run in the ``<registry.experiment>-monitor``
experiment. When the report names a trigger (prompt drift, or the champion's 👎 rate) and
``monitor.trigger`` is on, the flow emits the Prefect event ``lmops.monitor.threshold-crossed`` (the
UI's event feed, linked to this flow run), then runs the harvest flow and the training flow as its
subflows, each named ``... (monitor: <reason>)`` and tagged ``monitor-trigger``.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, tags, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.events import emit_event
from prefect.logging import get_run_logger

from flows.harvest import harvest_flow
from flows.training import training_flow
from lmcore.config import load_params, to_dict
from lmcore.feedback.monitor import report_markdown, report_metrics, run_monitor
from lmcore.registry.tracking import RunTracker, configure_mlflow
from lmcore.settings import get_settings

TRIGGER_EVENT = "lmops.monitor.threshold-crossed"
TRIGGER_TAG = "monitor-trigger"


@task(name="monitor-report")
def report_task(params_path: str | None) -> dict[str, Any]:
    """Drift of the recent prompts against the champion's training data, ratings and latency per version."""
    return run_monitor(load_params(params_path), get_settings())


@task(name="monitor-track")
def track_task(report: dict[str, Any], params_path: str | None) -> str:
    """The report's numbers as an MLflow run of ``<registry.experiment>-monitor``; returns its id."""
    params = load_params(params_path)
    configure_mlflow()
    tags_ = {"lmops.kind": "monitor", "lmops.champion": report["champion"] or "",
             "lmops.dataset_version": report["dataset_version"] or "", "lmops.triggered": str(bool(report["triggers"]))}
    with RunTracker.start(f"{params.registry.experiment}-monitor", run_name="monitor",
                          params={f"monitor.{k}": v for k, v in to_dict(params.monitor).items()}, tags=tags_,
                          system_metrics=False) as tracker:
        tracker.log_summary(report_metrics(report))
        tracker.log_dict(report, "monitor_report.json")
    return tracker.run_id


def publish_report(report: dict[str, Any]) -> None:
    """The report as markdown and a per-version table, artifacts of this flow run."""
    create_markdown_artifact(report_markdown(report), key="monitor-report", description="lmops monitoring")
    rows = [{"version": s["version"], "generations": s["generations"], "ratings": s["ratings"],
             "thumbs_down_rate": s["thumbs_down_rate"], "correction_rate": s["correction_rate"],
             **{f"latency_{k}_ms": v for k, v in s["latency_ms"].items()}} for s in report["versions"]]
    create_table_artifact(rows, key="monitor-versions", description="ratings and latency per model version")


def retrain(report: dict[str, Any], params_path: str | None) -> dict[str, Any]:
    """Emit the trigger event, then run harvest and training as named, tagged subflows of this run."""
    reason = "drift" if report["drift"]["drifted"] else "ratings"
    name = report["model_name"]
    event = emit_event(TRIGGER_EVENT, resource={"prefect.resource.id": f"lmops.model.{name}",
                                                "prefect.resource.name": name},
                       payload={"triggers": report["triggers"], "champion": report["champion"],
                                "dataset_version": report["dataset_version"]})
    get_run_logger().warning("threshold crossed (%s): running harvest, then training", "; ".join(report["triggers"]))
    with tags(TRIGGER_TAG, f"monitor-{reason}"):
        harvested = harvest_flow.with_options(flow_run_name=f"harvest (monitor: {reason})")(
            params_path=params_path, trigger_training=False)
        summary = training_flow.with_options(flow_run_name=f"training (monitor: {reason})")(params_path=params_path)
    return {
        "event_id": str(event.id) if event is not None else None,
        "harvest": {k: harvested.get(k) for k in ("new_rows", "version", "train_records")},
        "training": {"model_version": summary["model_version"], "promoted": summary["gate"]["promoted"],
                     "steps_trained": summary["steps_trained"]},
    }


@flow(name="monitor", log_prints=True)
def monitor_flow(params_path: str | None = None, trigger: bool | None = None) -> dict[str, Any]:
    """Report on serving; retrain when a threshold is crossed (``trigger``, default ``monitor.trigger``)."""
    params = load_params(params_path)
    report = report_task(params_path)
    publish_report(report)
    run_id = track_task(report, params_path)
    fire = bool(report["triggers"]) and (params.monitor.trigger if trigger is None else trigger)
    result = {"report": report, "mlflow_run_id": run_id, "triggered": fire, "event_id": None,
              "harvest": None, "training": None}
    if fire:
        result.update(retrain(report, params_path))
    return result
