"""The `training` flow: sources in, a gated champion out, every step a task over lmcore.

ingest -> prepare -> train -> evaluate -> register -> gate -> deploy. Registration and the
gate run under one registry lock so two runs at once can neither corrupt the registry nor
register the same model twice.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from flows.reporting import publish_summary, stage
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
from lmcore.data.prepare import training_data_line
from lmcore.device import pick_device
from lmcore.model.base import base_lineage
from lmcore.registry.models import registry_lock
from lmcore.registry.tracking import configure_mlflow, lineage_tags


def _cached(state) -> bool:
    return state.name == "Cached"


def run_cached(task, output_exists: Callable[[Any], bool], *args: Any):
    """Run a cached task; if the cache hit points at output that is gone, run it again for real."""
    state = task(*args, return_state=True)
    if _cached(state) and not output_exists(state.result()):
        state = task.with_options(refresh_cache=True)(*args, return_state=True)
    return state


def _choices_line(choices: dict | None) -> str:
    """``adamw, float32 (probe: AMD EPYC, avx2)``: what ``auto`` meant on this machine."""
    if not choices:
        return ""
    where = f" ({choices['source']}: {choices['cpu']}, {choices['cpu_class']})" if "cpu" in choices else ""
    return f"{choices['optimizer']}, {choices['dtype']}{where}"


@flow(name="training", log_prints=True)
def training_flow(
    sources: list[str] | None = None,
    params_path: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the loop once on `sources` (default: params.data.sources)."""
    params = load_params(params_path, overrides)
    configure_mlflow()
    steps = 7

    with stage(1, steps, "ingest + validate + version") as note:
        data = ingest_task(list(sources or params.data.sources), params, sources_named=bool(sources))
        version = data["version"]
        note["done"] = (f"dataset {version}: {data['accepted']} accepted, {data['quarantined']} quarantined"
                        if data["ingested"] else f"dataset {version} as it is: fine-tuning on its chat data, "
                        f"default sources ({', '.join(params.data.sources)}) not ingested (--source adds some)")

    with stage(2, steps, "prepare (tokenizer, split, memmap)") as note:
        prepared_state = run_cached(prepare_task, lambda d: (Path(d) / "meta.json").is_file(), version, params,
                                    data["kinds"])
        prepared = prepared_state.result()
        note["done"] = ("cached: " if _cached(prepared_state) else "") + training_data_line(Path(prepared))

    lineage = lineage_tags(
        dataset_version=version,
        dataset_git_rev=data.get("git_rev"),
        params_hash=params.slice_hash("data", "prepare", "tokenizer", "model", "train"),
        flow_run_id=str(flow_run.get_id() or ""),
        device=str(pick_device(params.train.device)),
    )
    if params.model.base:  # the pretrained base is lineage as much as the data is
        lineage.update(base_lineage(params.model.base), **{"lmops.finetune": "lora" if params.train.lora_r else "full"})
    with stage(3, steps, "train") as note:
        trained_state = run_cached(
            train_task, lambda t: (Path(t["model_dir"]) / "config.json").is_file(), prepared, data, params, lineage
        )
        trained = trained_state.result()
        note["done"] = "cached, no training work" if _cached(trained_state) else ", ".join(
            filter(None, [f"{trained['steps']} steps", _choices_line(trained.get("choices"))]))

    with stage(4, steps, "evaluate + track") as note:
        eval_state = run_cached(
            evaluate_task, lambda e: (Path(trained["out_dir"]) / "eval.json").is_file(),
            trained, prepared, params, lineage,
        )
        evaluated = eval_state.result()
        metrics = evaluated["metrics"]
        note["done"] = f"bits/byte {metrics.get('bits_per_byte', float('nan')):.4f}"

    with registry_lock():
        with stage(5, steps, "register") as note:
            registered = register_task(trained, evaluated["model_uri"], params, lineage)
            model_version = registered["version"]
            reused = " (reused: same data and params)" if registered["reused"] else ""
            note["done"] = f"{params.registry.model_name} v{model_version}{reused}"
        with stage(6, steps, "gate (challenger vs champion)") as note:
            decision = gate_task(registered, prepared, params)
            note["done"] = ("promoted" if decision["promoted"] else "kept champion") + f": {decision['reason']}"
    with stage(7, steps, "deploy") as note:
        deployed = deploy_task(decision, params)
        note["done"] = deployed

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
