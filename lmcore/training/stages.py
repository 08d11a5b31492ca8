"""DVC stage entry points: ``python -m lmcore.training.stages prepare|train|evaluate`` (see ``dvc.yaml``).

Each stage reads ``params.yaml`` through ``lmcore.config.load_params`` (the one loader) and uses
only its own slices, ``STAGE_PARAMS``: the ones ``dvc.yaml`` lists under ``params``, so DVC's change
detection and the stage agree. It calls the same lmcore function the Prefect tasks call:
``prepare_dataset``, ``train``, ``evaluate``. Paths are relative to the workspace (the folder
holding ``dvc.yaml``), where DVC runs the commands.

``STAGE_CODE`` names the modules that do each stage's work: ``dvc.yaml`` lists their files as the
stage's deps and the Prefect tasks hash their source into their cache keys (``flows.tasks``), so
``dvc repro`` and ``lmops run`` redo a stage on the same code changes (tests/test_config_agreement.py
checks ``dvc.yaml`` against both lists).

``prepare`` reads the *current* dataset version of the registry (``data/versions.jsonl`` + the
DVC cache), all kinds (raw and feedback), so the prepared data names its dataset version.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lmcore.config import load_params
from lmcore.data.prepare import params_tokenizer, prepare_dataset, training_kinds
from lmcore.data.prepared import WORKSPACE_PREPARED as PREPARED  # the one name of the workspace's prepared folder
from lmcore.data.prepared import current_dataset
from lmcore.data.versions import DataRegistry
from lmcore.errors import LmopsError
from lmcore.settings import apply_environment, get_settings
from lmcore.training.evaluate import evaluate
from lmcore.training.loop import train

MODEL_OUT = Path("models/latest")
EVAL_OUT = Path("metrics/eval.json")
STAGES = ("prepare", "train", "evaluate")
STAGE_PARAMS: dict[str, tuple[str, ...]] = {
    "prepare": ("prepare", "tokenizer", "model.base"),  # a base brings its own tokenizer
    "train": ("model", "train"),
    "evaluate": ("eval",),
}
STAGE_CODE: dict[str, tuple[str, ...]] = {
    "prepare": ("lmcore.data.prepare", "lmcore.data.tokenizer", "lmcore.data.chat"),
    "train": (
        "lmcore.training.loop", "lmcore.model.transformer", "lmcore.training.optimizers", "lmcore.device",
        "lmcore.model.checkpoint", "lmcore.model.weights", "lmcore.model.base", "lmcore.model.hf",
        "lmcore.training.lora",
    ),
    "evaluate": ("lmcore.training.evaluate", "lmcore.model.generate", "lmcore.model.weights"),
}


def code_files(stage: str) -> list[str]:
    """``STAGE_CODE[stage]`` as paths relative to the repository root (how ``dvc.yaml`` names deps)."""
    return [module.replace(".", "/") + ".py" for module in STAGE_CODE[stage]]


def run_stage(stage: str, workspace: Path | None = None) -> dict:
    """Run one stage in ``workspace`` (default: cwd); returns a small summary."""
    if stage not in STAGES:
        raise LmopsError(f"unknown stage '{stage}' (choose from {', '.join(STAGES)})")
    ws = Path(workspace or Path.cwd()).resolve()
    params = load_params(ws / "params.yaml")
    if stage == "prepare":
        settings = get_settings()

        reg = DataRegistry(ws, settings.home)
        current = current_dataset(reg)
        prepared = prepare_dataset(reg.iter_records(current.id, training_kinds(current, params)), ws / PREPARED,
                                   params.tokenizer, params.prepare, dataset_version=current.id,
                                   tokenizer=params_tokenizer(params))
        return {"stage": stage, "dataset_version": current.id, "prepared": str(prepared.dir)}
    if stage == "train":
        res = train(ws / PREPARED, ws / MODEL_OUT, params.model, params.train, progress=False)
        return {"stage": stage, "steps": res.steps, "final_val_loss": res.final_val_loss}
    if stage == "evaluate":
        metrics = evaluate(ws / MODEL_OUT / "model", ws / PREPARED, params.eval, out_path=ws / EVAL_OUT)
        return {"stage": stage, **{k: v for k, v in metrics.items() if isinstance(v, int | float)}}
    raise AssertionError(stage)  # every name in STAGES is handled above


def main(argv: list[str] | None = None) -> int:
    apply_environment()
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(f"usage: python -m lmcore.training.stages {{{'|'.join(STAGES)}}}", file=sys.stderr)
        return 2
    try:
        print(json.dumps(run_stage(args[0]), default=str))
    except LmopsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
