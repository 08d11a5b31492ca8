"""Hyper-parameter sweeps: search-space validation, --apply, nested MLflow runs, pruning, shared studies."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _lm_helpers import write_corpus
from _optimize_helpers import ROOT, _one_thread, module_home_fixture, params_file, run_cli  # noqa: F401

from lmcore.config import load_params
from lmcore.errors import LmopsError
from lmcore.optimize.apply import apply_params
from lmcore.optimize.space import check_against, parse_space

TINY = {
    "tokenizer.kind": "byte", "prepare.val_fraction": 0.2, "model.n_layer": 1, "model.n_head": 2,
    "model.n_kv_head": 2, "model.d_model": 32, "model.block_size": 32, "train.device": "cpu",
    "train.batch_size": 8, "train.warmup_steps": 0, "train.max_minutes": 0, "train.eval_iters": 2,
    "optimize.trial_max_steps": 20, "optimize.startup_trials": 1,
    "optimize.search_space": {"lr": {"low": 1.0e-5, "high": 1.0e-2, "log": True}, "n_layer": {"low": 1, "high": 2}},
}


@pytest.fixture()
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus", n_files=6, paragraphs=30)


@pytest.mark.code
@pytest.mark.parametrize("space, message", [
    ({"learning_rate": {"low": 0.1, "high": 1.0}}, "unknown parameter 'learning_rate'"),
    ({"lr": {"low": 0.01, "high": 0.001}}, "empty range"),
    ({"lr": {"low": 0.01, "high": 0.01}}, "empty range"),
    ({"d_model": {"choices": []}}, "choices must be a non-empty list"),
    ({"lr": {"low": 0.0, "high": 0.1, "log": True}}, "log range needs low > 0"),
    ({"n_layer": {"low": 1.5, "high": 4}}, "integer param"),
    ({"lr": {"low": 0.001, "high": 0.1, "choices": [0.01]}}, "either choices or low/high"),
    ({"lr": {"low": 0.001}}, "needs both low and high"),
    ({"lr": [0.001, 0.1]}, "must be {low, high}"),
    ({"max_steps": {"low": 10, "high": 100}}, "cannot be searched"),
    ({"lr": {"low": 0.001, "high": 0.1}, "train.lr": {"low": 0.01, "high": 0.1}}, "same parameter"),
    ({"tie_embeddings": {"low": 0, "high": 1}}, "not numeric"),
    ({"d_model": {"choices": ["big"]}}, "must be an integer"),
    ({}, "search_space is empty"),
])
def test_bad_search_space_is_one_line(space, message):
    with pytest.raises(LmopsError, match=message) as e:
        parse_space(space)
    assert "\n" not in str(e.value)


@pytest.mark.code
def test_space_parses_and_checks_each_value_against_the_params():
    dims = {d.key: d for d in parse_space({"lr": {"low": 1e-4, "high": 1e-2, "log": True}, "model.d_model":
                                           {"choices": [64, 128]}, "warmup_steps": {"low": 0, "high": 50, "step": 10}})}
    assert dims["train.lr"].kind == "float" and dims["train.lr"].log
    assert dims["model.d_model"].choices == (64, 128) and dims["train.warmup_steps"].step == 10
    params = load_params(ROOT / "params.yaml", {"model.n_head": 4})
    check_against(params, list(dims.values()))
    with pytest.raises(LmopsError, match="d_model=66 is invalid"):
        check_against(params, parse_space({"d_model": {"choices": [64, 66]}}))


@pytest.mark.code
def test_pruner_keeps_only_the_best_quartile_after_the_startup_trials():
    import optuna

    from lmcore.optimize.sweep import make_pruner, trial_eval_interval

    opt = load_params(ROOT / "params.yaml", {"optimize.startup_trials": 3, "optimize.prune_percentile": 25}).optimize
    study = optuna.create_study(pruner=make_pruner(opt))

    def complete(value: float) -> None:
        study.add_trial(optuna.trial.create_trial(value=value, intermediate_values={10: value}))

    def pruned_at(value: float) -> bool:
        trial = study.ask()
        trial.report(value, 10)
        pruned = trial.should_prune()
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return pruned

    complete(1.0)
    complete(2.0)
    assert not pruned_at(9.0)  # two of three startup trials: nothing is pruned yet
    complete(3.0)
    complete(4.0)
    assert not pruned_at(1.5)  # inside the best quarter (25th percentile of 1..4 = 1.75)
    assert pruned_at(2.2)  # better than the median (2.5), still pruned
    assert trial_eval_interval(opt) == opt.trial_max_steps // 10
    assert trial_eval_interval(dataclasses.replace(opt, trial_eval_interval=7)) == 7
    assert trial_eval_interval(dataclasses.replace(opt, trial_max_steps=5)) == 1
    with pytest.raises(LmopsError, match="prune_percentile"):
        load_params(ROOT / "params.yaml", {"optimize.prune_percentile": 150})


@pytest.mark.code
def test_apply_keeps_comments_and_order_and_refuses_bad_values(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text())
    before = path.read_text().splitlines()
    old_lr = load_params(path).train.lr
    changes = apply_params(path, {"train.lr": 0.00123456789, "model.d_model": 192, "train.min_lr": 1.2e-4})
    assert ("train.lr", old_lr, 0.00123457) in changes
    after = path.read_text().splitlines()
    assert len(after) == len(before)
    diff = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    assert {b.split(":")[0].strip() for _, b in diff} == {"lr", "d_model", "min_lr"}
    assert [a.split("#", 1)[1] for a, _ in diff if "#" in a] == [b.split("#", 1)[1] for _, b in diff if "#" in b]
    comments = [line for line in before if line.lstrip().startswith("#")]
    assert comments == [line for line in after if line.lstrip().startswith("#")] and comments
    p = load_params(path)
    assert p.train.lr == 0.00123457 and p.model.d_model == 192
    text = path.read_text()
    with pytest.raises(LmopsError, match="train.lr"):
        apply_params(path, {"train.lr": -1.0})
    assert path.read_text() == text and [f.name for f in tmp_path.iterdir()] == ["params.yaml"]


@pytest.mark.code
def test_bad_space_via_cli_fails_before_anything_is_created(tmp_path, lmops_home, corpus, capsys):
    p = params_file(tmp_path, {**TINY, "optimize.search_space": {"lr": {"low": 0.1, "high": 0.01}}})
    code, _, err = run_cli("optimize", "sweep", "--params", str(p), "--data", str(corpus), "--trials", "2",
                           capsys=capsys)
    assert code == 1 and err.startswith("error: ") and "empty range" in err and len(err.strip().splitlines()) == 1
    assert not lmops_home.exists() or not any(lmops_home.rglob("*.db"))
    code, _, err = run_cli("optimize", "sweep", "--params", str(p), "-S", "optimize.search_space={bogus: {low: 1, "
                           "high: 2}}", "--data", str(corpus), capsys=capsys)
    assert code == 1 and "unknown parameter 'bogus'" in err


@pytest.mark.model
def test_sweep_nests_runs_prunes_and_applies_best(tmp_path, module_home, corpus, capsys):
    import optuna

    from lmcore.registry.tracking import get_client

    p = params_file(tmp_path, TINY)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="t", storage=storage, direction="minimize")
    study.enqueue_trial({"train.lr": 1e-2, "model.n_layer": 1})  # a good trial, then a hopeless one
    study.enqueue_trial({"train.lr": 1e-5, "model.n_layer": 1})
    code, out, err = run_cli("optimize", "sweep", "--params", str(p), "--data", str(corpus), "--trials", "3",
                             "--study", "t", "--storage", storage, "--apply", "--json", capsys=capsys)
    assert code == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert res["trials_run"] == 3 and res["pruned"] >= 1 and res["completed"] >= 1
    states = {t.number: t.state.name for t in optuna.load_study(study_name="t", storage=storage).trials}
    assert states[0] == "COMPLETE" and states[1] == "PRUNED"

    client = get_client()
    parent = client.get_run(res["parent_run_id"])
    assert parent.data.tags["lmops.study"] == "t" and parent.info.status == "FINISHED"
    assert parent.data.metrics["best_val_loss"] == pytest.approx(res["best_value"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 3
    by_trial = {int(r.data.tags["lmops.trial"]): r for r in children}
    assert by_trial[1].data.tags["trial_state"] == "PRUNED" and by_trial[1].info.status == "KILLED"
    assert by_trial[0].data.tags["trial_state"] == "COMPLETE" and by_trial[0].info.status == "FINISHED"
    assert "val_loss" in by_trial[0].data.metrics
    files = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "best_params.json"} <= files
    csv_text = Path(client.download_artifacts(parent.info.run_id, "trials.csv", str(tmp_path))).read_text()
    assert len(csv_text.strip().splitlines()) == 4 and "PRUNED" in csv_text

    applied = load_params(p)
    assert applied.train.lr == pytest.approx(res["best_params"]["train.lr"], rel=1e-5)
    assert applied.model.n_layer == res["best_params"]["model.n_layer"]
    assert applied.train.min_lr <= applied.train.lr  # min_lr follows a searched lr
    assert "# each key is a model.* or train.* param" in p.read_text()  # comments kept
    assert not list((module_home / "runs" / "sweeps" / "t").iterdir())  # trial folders cleaned up


@pytest.mark.model
@pytest.mark.slow
def test_two_workers_share_one_study_then_resume(tmp_path, module_home, corpus):
    import optuna

    from lmcore.config import load_params as lp
    from lmcore.optimize.sweep import resolve_data, run_sweep

    p = params_file(tmp_path, TINY)
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    env = {**os.environ, "LMOPS_HOME": str(module_home), "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "flows.cli", "optimize", "sweep", "--params", str(p), "--data", str(corpus),
            "--trials", "3", "--study", "shared", "--storage", storage, "--json"]
    resolve_data(str(corpus), lp(p))  # prepare once up front, as a flow would
    procs = [subprocess.Popen([*base, "--seed", str(s)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for s in (1, 2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert [r["trials_run"] for r in results] == [3, 3]
    trials = optuna.load_study(study_name="shared", storage=storage).trials
    assert sorted(t.number for t in trials) == list(range(6))
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    assert len({t.user_attrs["run_id"] for t in trials}) == 6 and len({t.user_attrs["worker"] for t in trials}) == 2
    resumed = run_sweep(lp(p), resolve_data(str(corpus), lp(p))[0], trials=1, study_name="shared", storage=storage,
                        track=False)
    assert resumed.trials_run == 1 and resumed.trials_total == 7


@pytest.mark.data
@pytest.mark.slow
def test_sweep_defaults_to_the_current_dataset_version(tiny_workspace):
    from flows.tasks import prepare_key
    from lmcore.data.ingest import ingest
    from lmcore.data.versions import DataRegistry
    from lmcore.optimize.sweep import resolve_data, run_sweep

    params = load_params(tiny_workspace / "params.yaml", {
        "optimize.trial_max_steps": 6, "optimize.search_space": {"lr": {"low": 1e-3, "high": 1e-2}}})
    with pytest.raises(LmopsError, match="no dataset version"):
        resolve_data(None, params)
    reg = DataRegistry.open()
    reg.ensure_initialized()
    ingest([str(tiny_workspace / "corpus")], params.data, registry=reg, progress=False)
    version = reg.current().id
    data_dir, got = resolve_data(None, params)
    assert got == version and data_dir.name == prepare_key(version, params)  # the training flow's prepared folder
    res = run_sweep(params, data_dir, trials=2, track=False, dataset_version=got)
    assert res.trials_run == 2 and res.completed == 2 and set(res.best_params) == {"train.lr", "train.min_lr"}
