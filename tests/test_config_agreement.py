"""Code tier: the files that say the same thing twice agree, so nothing has two sources of truth.

- dvc.yaml's code deps and params per stage == ``lmcore.training.stages.STAGE_CODE`` / ``STAGE_PARAMS``, the
  lists the Prefect cache keys hash, so `dvc repro` and `lmops run` retrain on the same changes;
- prefect.yaml's deployments carry params.yaml's crons and time zone;
- the local UI ports are written once, in ``lmcore.settings``;
- ``ModelConfig`` is params.yaml's model slice plus the vocabulary size.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from lmcore.config import ModelParams, load_params
from lmcore.training.stages import STAGE_CODE, STAGE_PARAMS, STAGES, code_files

pytestmark = pytest.mark.code

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINT = "lmcore/training/stages.py"  # the command DVC runs; the Prefect tasks call the stage functions directly


def _dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_deps_are_the_stage_code(stage):
    spec = _dvc_stages()[stage]
    code = {d for d in spec["deps"] if d.startswith("lmcore/") and d.endswith(".py")} - {ENTRY_POINT}
    assert code == set(code_files(stage)), (
        f"dvc.yaml's {stage} deps and lmcore.training.stages.STAGE_CODE[{stage!r}] differ: "
        f"only in dvc.yaml {sorted(code - set(code_files(stage)))}, "
        f"only in STAGE_CODE {sorted(set(code_files(stage)) - code)}")
    assert all((ROOT / f).is_file() for f in code_files(stage))


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_params_are_the_stage_slices(stage):
    assert tuple(_dvc_stages()[stage]["params"]) == STAGE_PARAMS[stage]


def test_dvc_has_exactly_the_stages():
    assert set(_dvc_stages()) == set(STAGES) == set(STAGE_CODE) == set(STAGE_PARAMS)


def test_prefect_cache_keys_hash_the_stage_code():
    import flows.tasks as tasks

    hashed = {"prepare": tasks.PREPARE_CODE, "train": tasks.TRAIN_CODE, "evaluate": tasks.EVALUATE_CODE}
    assert hashed == STAGE_CODE
    for stage in STAGES:  # every listed module imports, so source_hash can read it
        assert tasks.source_hash(*STAGE_CODE[stage])


def test_prefect_yaml_schedules_are_params_yaml():
    from flows.schedule import prefect_yaml_differences

    params = load_params(ROOT / "params.yaml")
    assert prefect_yaml_differences(params, ROOT / "prefect.yaml") == []


def test_prefect_yaml_check_names_a_difference(tmp_path):
    from flows.schedule import prefect_yaml_differences

    params = load_params(ROOT / "params.yaml", {"schedule.harvest_cron": "*/5 * * * *"})
    diffs = prefect_yaml_differences(params, ROOT / "prefect.yaml")
    assert len(diffs) == 1 and diffs[0].startswith("hourly:") and "*/5 * * * *" in diffs[0]
    doc = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    doc["deployments"] = [d for d in doc["deployments"] if d["name"] != "hourly"]
    (tmp_path / "prefect.yaml").write_text(yaml.safe_dump(doc))
    assert prefect_yaml_differences(load_params(ROOT / "params.yaml"), tmp_path / "prefect.yaml") == [
        "deployment 'hourly' is missing"]


PORT_LITERAL = re.compile(r"(port|://|:)\D{0,40}\b(4200|5000)\b", re.IGNORECASE)


def test_ui_ports_are_written_once():
    from lmcore.settings import MLFLOW_PORT, PREFECT_PORT

    assert (MLFLOW_PORT, PREFECT_PORT) == (5000, 4200)
    hits = [f"{path.relative_to(ROOT)}:{i}: {line.strip()}"
            for folder in ("lmcore", "flows") for path in sorted((ROOT / folder).rglob("*.py"))
            if path != ROOT / "lmcore" / "settings.py"
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if PORT_LITERAL.search(line)]
    assert not hits, "use lmcore.settings.MLFLOW_PORT / PREFECT_PORT:\n" + "\n".join(hits)


def test_model_config_is_the_model_slice_plus_vocab():
    from lmcore.model.transformer import ModelConfig

    assert issubclass(ModelConfig, ModelParams)
    extra = {f.name for f in dataclasses.fields(ModelConfig)} - {f.name for f in dataclasses.fields(ModelParams)}
    assert extra == {"vocab_size"}
    p = load_params(ROOT / "params.yaml")
    cfg = ModelConfig.from_params(p.model, 300)
    assert cfg.vocab_size == 300 and all(getattr(cfg, k) == v for k, v in dataclasses.asdict(p.model).items())
    assert ModelConfig().vocab_size == p.tokenizer.vocab_size
