"""The `training` flow: sources in, a gated champion out, every step a task over lmcore.

ingest -> prepare -> train -> evaluate -> register -> gate -> deploy. Registration and the
gate run under one registry lock so two runs at once can neither corrupt the registry nor
register the same model twice.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from flows.reporting import publish_summary
from flows.tasks import (
    deploy_task,
    evaluate_task,
    gate_task,
    ingest_task,
    prepare_task,
    register_task,
    train_task,
)
from lmcore.config import load_params
from lmcore.locks import file_lock
from lmcore.settings import get_settings


def _cached(state) -> bool:
    return state.name == "Cached"


@flow(name="training", log_prints=True)
def training_flow(
    sources: list[str] | None = None,
    params_path: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the loop once on `sources` (default: params.data.sources)."""
    from lmcore.device import pick_device
    from lmcore.tracking import configure_mlflow, lineage_tags

    params = load_params(params_path, overrides)
    configure_mlflow()
    data = ingest_task(list(sources or params.data.sources), params)
    version = data["version"]

    prepared_state = prepare_task(version, params, return_state=True)
    prepared = prepared_state.result()

    lineage = lineage_tags(
        dataset_version=version,
        dataset_git_rev=data.get("git_rev"),
        params_hash=params.slice_hash("data", "prepare", "tokenizer", "model", "train"),
        flow_run_id=str(flow_run.get_id() or ""),
        device=str(pick_device(params.train.device)),
    )
    trained_state = train_task(prepared, data, params, lineage, return_state=True)
    trained = trained_state.result()
    eval_state = evaluate_task(trained, prepared, params, lineage, return_state=True)
    evaluated = eval_state.result()
    metrics = evaluated["metrics"]

    with file_lock(get_settings().home / "locks" / "model-registry.lock"):
        model_version = register_task(trained, evaluated["model_uri"], params, lineage)
        decision = gate_task(model_version, prepared, params)
    deployed = deploy_task(decision, params)

    summary = {
        "dataset": data,
        "prepared_dir": prepared,
        "train": trained,
        "metrics": metrics,
        "model_name": params.registry.model_name,
        "model_version": model_version,
        "gate": decision,
        "deploy": deployed,
        "cached": {
            "prepare": _cached(prepared_state),
            "train": _cached(trained_state),
            "evaluate": _cached(eval_state),
        },
        "steps_trained": 0 if _cached(trained_state) else trained["steps"],
    }
    publish_summary(summary)
    return summary
