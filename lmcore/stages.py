"""DVC stage entry points: ``python -m lmcore.stages prepare|train|evaluate`` (see ``dvc.yaml``).

Each stage reads only its own slices of ``params.yaml`` (the ones ``dvc.yaml`` lists under
``params``, so DVC's change detection and the stage agree) and calls the same lmcore function
the Prefect tasks call: ``prepare_dataset``, ``train``, ``evaluate``. Paths are relative to the
workspace (the folder holding ``dvc.yaml``), where DVC runs the commands.

``prepare`` reads the *current* dataset version of the registry (``data/versions.jsonl`` + the
DVC cache), all kinds (raw and feedback), so the prepared data names its dataset version.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

PREPARED = Path("data/prepared")
MODEL_OUT = Path("models/latest")
EVAL_OUT = Path("metrics/eval.json")
STAGES = ("prepare", "train", "evaluate")


def _slice(section: str, cls: type, params_path: Path) -> Any:
    import yaml

    from lmcore.config import from_dict
    from lmcore.errors import LmopsError

    if not params_path.is_file():
        raise LmopsError(f"params file not found: {params_path}")
    raw = yaml.safe_load(params_path.read_text(encoding="utf-8")) or {}
    return from_dict(cls, raw.get(section), section)


def run_stage(stage: str, workspace: Path | None = None) -> dict:
    """Run one stage in ``workspace`` (default: cwd); returns a small summary."""
    from lmcore.config import EvalParams, ModelParams, PrepareParams, TokenizerParams, TrainParams
    from lmcore.errors import LmopsError

    ws = Path(workspace or Path.cwd()).resolve()
    params_path = ws / "params.yaml"
    if stage == "prepare":
        from lmcore.data.registry import DataRegistry
        from lmcore.prepare import prepare_dataset
        from lmcore.settings import get_settings

        settings = get_settings()
        reg = DataRegistry(ws, settings.home)
        current = reg.current()
        if current is None:
            raise LmopsError("no dataset version yet: run `lmops ingest` (or `dvc pull` in a clone) first")
        prepared = prepare_dataset(reg.iter_records(current.id), ws / PREPARED,
                                   _slice("tokenizer", TokenizerParams, params_path),
                                   _slice("prepare", PrepareParams, params_path), dataset_version=current.id)
        return {"stage": stage, "dataset_version": current.id, "prepared": str(getattr(prepared, "out_dir", PREPARED))}
    if stage == "train":
        from lmcore.train import train

        res = train(ws / PREPARED, ws / MODEL_OUT, _slice("model", ModelParams, params_path),
                    _slice("train", TrainParams, params_path), progress=False)
        return {"stage": stage, "steps": res.steps, "final_val_loss": res.final_val_loss}
    if stage == "evaluate":
        from lmcore.evaluate import evaluate

        metrics = evaluate(ws / MODEL_OUT / "model", ws / PREPARED, _slice("eval", EvalParams, params_path),
                           out_path=ws / EVAL_OUT)
        return {"stage": stage, **{k: v for k, v in metrics.items() if isinstance(v, int | float)}}
    raise LmopsError(f"unknown stage '{stage}' (choose from {', '.join(STAGES)})")


def main(argv: list[str] | None = None) -> int:
    import json

    from lmcore.errors import LmopsError
    from lmcore.settings import apply_environment

    apply_environment()
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(f"usage: python -m lmcore.stages {{{'|'.join(STAGES)}}}", file=sys.stderr)
        return 2
    try:
        print(json.dumps(run_stage(args[0]), default=str))
    except LmopsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
