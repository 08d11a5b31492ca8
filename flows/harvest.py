"""The `harvest` flow: feedback since the last watermark -> validated, versioned training data,
and a training run when enough new records arrived."""

from __future__ import annotations

from typing import Any

from prefect import flow, task

from flows.training import training_flow
from lmcore.config import load_params
from lmcore.feedback.harvest import harvest
from lmcore.settings import get_settings


@task(name="harvest-feedback")
def harvest_task(params_path: str | None) -> dict[str, Any]:
    """Claim new feedback rows, validate them (expectations/feedback.json), version a shard."""

    return harvest(get_settings(), load_params(params_path)).to_dict()


@flow(name="harvest", log_prints=True)
def harvest_flow(params_path: str | None = None, trigger_training: bool = True) -> dict[str, Any]:
    """Harvest feedback; run the training flow when `feedback.min_new_records` arrived."""
    result = harvest_task(params_path)
    result["training"] = None
    if result.get("should_train") and trigger_training:
        summary = training_flow(params_path=params_path)
        result["training"] = {"model_version": summary["model_version"], "promoted": summary["gate"]["promoted"]}
    return result
