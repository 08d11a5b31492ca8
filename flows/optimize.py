"""The `optimize` flow: a hyper-parameter sweep on the current dataset version, as one run
in the Prefect UI with the trials table as an artifact (trials themselves are nested MLflow runs)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_table_artifact

from lmcore.config import Params, load_params
from lmcore.optimize.apply import apply_params
from lmcore.optimize.sweep import resolve_data, run_sweep
from lmcore.settings import get_settings


@task(name="prepare-for-sweep")
def sweep_data_task(params: Params, data: str | None) -> tuple[str, str | None]:
    """The prepared folder the trials train on (the training flow's, for the current version)."""
    path, version = resolve_data(data, params)
    return str(path), version


@task(name="sweep")
def sweep_task(params: Params, data_dir: str, version: str | None, trials: int | None,
               minutes: float | None, study: str | None) -> dict[str, Any]:
    """Optuna TPE + percentile pruning; each trial a nested MLflow run under one parent."""
    return asdict(run_sweep(params, data_dir, trials=trials, minutes=minutes, study_name=study,
                            dataset_version=version))


@flow(name="optimize", log_prints=True)
def optimize_flow(
    params_path: str | None = None,
    trials: int | None = None,
    minutes: float | None = None,
    study: str | None = None,
    data: str | None = None,
    apply: bool = False,
) -> dict[str, Any]:
    """Sweep the search space in params.yaml; with `apply`, write the best params back to it."""
    params = load_params(params_path)
    data_dir, version = sweep_data_task(params, data)
    result = sweep_task(params, data_dir, version, trials, minutes, study)
    rows = [{k: v for k, v in t.items() if not isinstance(v, dict | list)} for t in result["trials"]]
    if rows:
        create_table_artifact(rows, key="sweep-trials", description=f"trials of study {result['study']}")
    result["applied"] = []
    if apply and result["best_params"]:
        changes = apply_params(params_path or get_settings().params_path, result["best_params"])
        result["applied"] = [list(c) for c in changes]
    return result
