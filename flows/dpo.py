"""The `dpo` flow: the champion (an SFT model) learns from harvested preference pairs, then the gate decides.

pairs (the current dataset version's ``preference`` records, holdout left out) -> DPO from
``models:/<name>@champion`` -> evaluate -> register -> gate (bits per byte, the golden set, the
share of harvested pairs each model prefers, the HF export) -> deploy. Each step is the same task
the training flow runs, except the DPO step itself.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from flows.reporting import stage
from flows.tasks import deploy_task, dpo_key, dpo_task, evaluate_task, gate_task, prepare_task, register_task
from lmcore.config import load_params
from lmcore.data.prepare import training_kinds
from lmcore.data.prepared import current_dataset
from lmcore.data.versions import DataRegistry
from lmcore.device import pick_device
from lmcore.errors import LmopsError
from lmcore.feedback.harvest import read_pairs
from lmcore.model.base import base_lineage
from lmcore.registry.models import fetch_model_dir, registry_lock
from lmcore.registry.tracking import configure_mlflow, lineage_tags


@flow(name="dpo", log_prints=True)
def dpo_flow(params_path: str | None = None, overrides: dict[str, Any] | None = None,
             model_uri: str | None = None) -> dict[str, Any]:
    """DPO on the harvested pairs from ``model_uri`` (default: the champion); registered and gated."""
    params = load_params(params_path, overrides)
    configure_mlflow()
    steps = 5
    with stage(1, steps, "preference pairs + SFT model") as note:
        current = current_dataset(DataRegistry.open(), hint=" and `lmops harvest` feedback")
        pairs = [p for p in read_pairs(DataRegistry.open(), current.id) if p.get("split") != "holdout"]
        if not pairs:
            raise LmopsError(f"no preference pairs in dataset {current.id}: rate or correct answers in the "
                             "playground, then run `lmops harvest`")
        uri = model_uri or f"models:/{params.registry.model_name}@champion"
        sft_dir, info = fetch_model_dir(uri)
        sft = {"uri": uri if info["version"] is None else f"models:/{info['name']}/{info['version']}",
               "dir": str(sft_dir)}
        prepared = prepare_task(current.id, params, list(training_kinds(current, params)))  # the gate's val text
        note["done"] = f"{len(pairs)} pairs from dataset {current.id}; SFT model {sft['uri']}"
    lineage = lineage_tags(dataset_version=current.id, dataset_git_rev=current.git_rev,
                           params_hash=params.slice_hash("dpo"), flow_run_id=str(flow_run.get_id() or ""),
                           device=str(pick_device(params.train.device)))
    if params.model.base:
        lineage.update(base_lineage(params.model.base))
    lineage["lmops.finetune"] = "dpo"
    key = dpo_key(sft["uri"], current.id, params)
    with stage(2, steps, "DPO (reference log-probs once, then train)") as note:
        trained = dpo_task(sft, pairs, key, params, lineage)
        before, after = trained["before"]["preference_accuracy"], trained["after"]["preference_accuracy"]
        note["done"] = f"{trained['steps']} steps; prefers the chosen text in {before:.0%} -> {after:.0%} of its pairs"
    with stage(3, steps, "evaluate + track") as note:
        evaluated = evaluate_task(trained, prepared, params, lineage)
        note["done"] = f"bits/byte {evaluated['metrics'].get('bits_per_byte', float('nan')):.4f}"
    with registry_lock(), stage(4, steps, "register + gate") as note:
        registered = register_task(trained, evaluated["model_uri"], params, lineage)
        decision = gate_task(registered, prepared, params)
        note["done"] = ("promoted" if decision["promoted"] else "kept champion") + f": {decision['reason']}"
    with stage(5, steps, "deploy") as note:
        deployed = deploy_task(decision, params)
        note["done"] = deployed
    return {"pairs": len(pairs), "sft_model": sft["uri"], "dpo": trained, "metrics": evaluated["metrics"],
            "model_version": registered["version"], "gate": decision, "deploy": deployed}
