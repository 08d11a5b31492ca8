"""Hyper-parameter search: Optuna TPE + percentile pruning over short training runs, tracked in MLflow.

Why this shape: each trial is an ordinary ``lmcore.training.loop.train`` run with ``max_steps =
optimize.trial_max_steps``; its periodic ``val_loss`` feeds a ``PercentilePruner`` through
``on_metrics``, which raises ``optuna.TrialPruned`` to stop a hopeless trial early (see
``make_pruner`` for why a quartile rather than the median). The study lives in an RDB
(SQLite under the lmops home by default, any SQLAlchemy URL for several workers), so a sweep
can be resumed by name and run by several processes at once.

MLflow layout: one parent run per ``run_sweep`` call (tag ``lmops.study``), one nested run
per trial (tag ``mlflow.parentRunId``). A pruned trial's run ends ``KILLED`` with tag
``trial_state=PRUNED`` (completed: ``FINISHED``/``COMPLETE``; invalid param combination:
``FAILED``/``FAIL``). The parent holds ``trials.csv`` (every trial of the study, also other
workers'), ``best_params.json`` and the best value as metric ``best_val_loss``.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import time
import uuid
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from lmcore.data.prepare import load_prepared
from lmcore.data.prepared import resolve_prepared
from lmcore.errors import LmopsError
from lmcore.locks import file_lock
from lmcore.optimize.apply import apply_params
from lmcore.optimize.space import Dim, check_against, derive, parse_space, with_overrides
from lmcore.registry.tracking import RunTracker
from lmcore.settings import get_settings
from lmcore.training.loop import train

TrialCallback = Callable[[dict[str, Any]], None]
MetricsCallback = Callable[[int, int, dict[str, float]], None]


@dataclass(frozen=True)
class SweepResult:
    study: str
    storage: str
    parent_run_id: str | None
    trials_run: int  # by this call
    trials_total: int  # in the study, all workers
    completed: int
    pruned: int
    failed: int
    best_value: float | None
    best_params: dict[str, Any]  # dotted keys -> values
    best_trial: int | None
    seconds: float
    trials: list[dict[str, Any]] = field(default_factory=list)


# --------------------------------------------------------------------------- data


def resolve_data(data: str | Path | None, params: Any) -> tuple[Path, str | None]:
    """A prepared data folder for the sweep, and its dataset version (``lmcore.data.prepared``).

    ``data`` may be a prepared folder (has ``meta.json``), a text file or folder (prepared once
    into ``<home>/runs/prepared/text-<hash>``), or None: the data registry's current version,
    prepared into ``<home>/runs/prepared/<key>`` with the same key the training flow uses.
    """
    return resolve_prepared(data, params)


# --------------------------------------------------------------------------- storage


def default_storage() -> str:
    return get_settings().ensure().optuna_db


def open_storage(url: str) -> Any:
    """An Optuna RDB storage; SQLite gets a long busy timeout so several workers can share a file.

    Workers started together race to create the schema (the loser hits a UNIQUE constraint on
    Optuna's alembic version row): a SQLite file is created under a file lock, and any URL is
    retried a few times on such an error before giving up.
    """
    engine_kwargs: dict[str, Any] = {}
    lock_path = None
    if url.startswith("sqlite"):
        engine_kwargs = {"connect_args": {"timeout": 60}}
        db = url.split(":///", 1)[-1]
        if db and db != ":memory:" and Path(db).parent.is_dir():
            lock_path = f"{db}.create.lock"
    for attempt in range(4):
        try:
            lock = file_lock(lock_path, timeout_s=120) if lock_path else nullcontext()
            with lock, warnings.catch_warnings():  # heartbeat_interval is flagged experimental; it reaps dead trials
                warnings.simplefilter("ignore")
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=30,
                                                  grace_period=120)
        except Exception as e:  # SQLAlchemy / Optuna raise many types for a bad URL
            racing = type(e).__name__ == "IntegrityError" or any(
                m in str(e) for m in ("already exists", "database is locked"))
            if attempt < 3 and racing:  # another worker is creating the schema
                time.sleep(0.5 * (attempt + 1))
                continue
            raise LmopsError(f"cannot open the study storage {url}: {str(e).splitlines()[0]}") from None


# --------------------------------------------------------------------------- sweep


def _trial_row(t: Any) -> dict[str, Any]:
    return {
        "number": t.number,
        "state": t.state.name,
        "value": t.value,
        "seconds": round(t.duration.total_seconds(), 3) if t.duration else None,
        "last_step": t.last_step,
        "worker": t.user_attrs.get("worker"),
        "run_id": t.user_attrs.get("run_id"),
        **{f"param.{k}": v for k, v in sorted(t.params.items())},
    }


def trials_csv(rows: list[dict[str, Any]]) -> str:
    cols: list[str] = []
    for r in rows:
        cols.extend(c for c in r if c not in cols)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def trial_eval_interval(opt: Any) -> int:
    """Steps between a trial's val_loss reports: ``optimize.trial_eval_interval``, 0 = ten per trial.

    The pruner can stop a trial only at a report, so a hopeless trial runs at least to the first
    one: with five reports that is 20% of a full trial, with ten 10% (each report costs
    ``train.eval_iters`` forward batches). On ``bench/sweep.py`` ten instead of five cut the pruned
    sweep's training steps from 0.48 to 0.40 of the full sweep's.
    """
    return opt.trial_eval_interval or max(1, opt.trial_max_steps // 10)


def trial_params(params: Any, values: dict[str, Any]) -> Any:
    """The params one trial trains with: the searched ``values`` (plus what they imply, see ``derive``)
    on a short run of ``optimize.trial_max_steps`` steps, reporting every ``trial_eval_interval``."""
    opt = params.optimize
    every = trial_eval_interval(opt)
    p = with_overrides(params, derive(params, values))
    return with_overrides(p, {"train.max_steps": opt.trial_max_steps, "train.eval_interval": every,
                              "train.checkpoint_interval": 0, "train.log_interval": min(p.train.log_interval, every)})


def make_pruner(opt: Any) -> Any:
    """Stop a trial whose best val_loss so far is outside the best ``optimize.prune_percentile`` percent.

    Compared with the completed trials' val_loss at the same step, once ``optimize.startup_trials``
    have completed. A quartile (25) rather than the median (50): on ``bench/sweep.py`` the median
    let 11 of 20 trials run to the end (time ratio vs no pruning 0.64), the quartile 5 (0.43-0.48);
    the best val_loss found moved by +0.45%, well inside one config's seed-to-seed spread (sd ~1.1%).
    """
    return optuna.pruners.PercentilePruner(opt.prune_percentile, n_startup_trials=opt.startup_trials)


def run_sweep(
    params: Any,
    data_dir: str | Path,
    *,
    trials: int | None = None,
    minutes: float | None = None,
    study_name: str | None = None,
    storage: str | None = None,
    seed: int | None = None,
    pruning: bool = True,
    dataset_version: str | None = None,
    track: bool = True,
    work_dir: str | Path | None = None,
    on_trial: TrialCallback | None = None,
    on_metrics: MetricsCallback | None = None,
) -> SweepResult:
    """Run ``trials`` trials (default ``optimize.trials``) of ``study_name`` on a prepared ``data_dir``.

    ``params`` is the base ``Params``; searched values override its ``model``/``train`` slices and
    each trial trains ``optimize.trial_max_steps`` steps. ``minutes`` (default ``optimize.minutes``,
    0 = none) stops starting new trials after that long. A named study that exists is resumed
    (new trials are added); the sampler seed is offset by the trials it already holds.
    ``on_trial(row)`` is called after each trial, ``on_metrics(trial, step, metrics)`` at each
    training log/eval step. Returns the study's best trial over *all* its trials.
    """
    opt = params.optimize
    dims = parse_space(opt.search_space)
    check_against(params, dims)
    n_trials = opt.trials if trials is None else trials
    if n_trials <= 0:
        raise LmopsError("--trials must be > 0")
    budget_min = opt.minutes if minutes is None else minutes
    if budget_min < 0:
        raise LmopsError("--minutes must be >= 0 (0 = no limit)")
    data_dir = Path(data_dir)
    prepared = load_prepared(data_dir)  # fail before creating anything when the data is missing
    dataset_version = dataset_version or prepared.dataset_version

    storage_url = storage or opt.storage or default_storage()
    study, name, sampler_seed = _open_study(opt, storage_url, study_name, seed, pruning, n_trials)
    work = Path(work_dir) if work_dir else get_settings().runs_dir / "sweeps" / name
    work.mkdir(parents=True, exist_ok=True)
    worker = uuid.uuid4().hex[:8]  # this call, in trial attributes and tags (several may share a study)
    parent = None
    if track:
        parent = _start_parent(params, name, storage_url, n_trials, budget_min, pruning, sampler_seed,
                               dataset_version, worker)
    objective = _Objective(params, dims, data_dir, work, name, worker, dataset_version, parent, on_metrics)

    def after(study: Any, frozen: Any) -> None:
        if on_trial is not None:
            on_trial(_trial_row(frozen))

    t0 = time.perf_counter()
    try:
        study.optimize(objective, n_trials=n_trials, timeout=budget_min * 60 or None, catch=(_InvalidTrial,),
                       callbacks=[after], gc_after_trial=False)
    except BaseException:
        if parent is not None:
            _finish_parent(parent, study, name, "FAILED")
        raise
    result = _summarize(study, params, name, storage_url, parent, objective.ran, time.perf_counter() - t0)
    if parent is not None:
        _finish_parent(parent, study, name, "FINISHED", result)
    return result


def _open_study(opt: Any, storage_url: str, study_name: str | None, seed: int | None, pruning: bool,
                n_trials: int) -> tuple[Any, str, int]:
    """The study (created, or resumed by name) and its sampler's seed.

    A resumed study's seed moves past the trials already there, so it repeats no start-up draws.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rdb = open_storage(storage_url)
    name = study_name or f"sweep-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    try:
        offset = len(rdb.get_all_trials(rdb.get_study_id_from_name(name), deepcopy=False))
    except KeyError:  # a new study
        offset = 0
    sampler_seed = (opt.seed if seed is None else seed) + offset
    sampler = optuna.samplers.TPESampler(seed=sampler_seed, n_startup_trials=min(10, max(1, n_trials // 2)))
    pruner = make_pruner(opt) if pruning else optuna.pruners.NopPruner()
    study = optuna.create_study(study_name=name, storage=rdb, direction="minimize", sampler=sampler, pruner=pruner,
                                load_if_exists=True)
    return study, name, sampler_seed


def _start_parent(params: Any, name: str, storage_url: str, n_trials: int, budget_min: float, pruning: bool,
                  sampler_seed: int, dataset_version: str | None, worker: str) -> Any:
    """The sweep's MLflow parent run: the search's settings as params, the study as tags."""
    opt = params.optimize
    return RunTracker.start(
        params.registry.experiment, f"sweep-{name}",
        params={"optimize.trials": n_trials, "optimize.minutes": budget_min, "optimize.pruning": pruning,
                "optimize.prune_percentile": opt.prune_percentile, "optimize.startup_trials": opt.startup_trials,
                "optimize.trial_max_steps": opt.trial_max_steps,
                "optimize.trial_eval_interval": trial_eval_interval(opt), "optimize.seed": sampler_seed,
                "optimize.search_space": json.dumps(opt.search_space, sort_keys=True),
                "dataset_version": dataset_version or "unknown"},
        tags={"lmops.study": name, "lmops.storage": _redact(storage_url), "lmops.kind": "sweep",
              "lmops.dataset_version": dataset_version or "unknown", "lmops.worker": worker},
        system_metrics=False,
    )


@dataclass
class _Objective:
    """One trial: sample the values, train a short run in a scratch folder, report val_loss to the pruner."""

    params: Any
    dims: list[Dim]
    data_dir: Path
    work: Path
    study: str
    worker: str
    dataset_version: str | None
    parent: Any  # the MLflow parent run, or None when not tracking
    on_metrics: MetricsCallback | None
    ran: list[int] = field(default_factory=list)  # trial numbers this call ran (enqueued ones already have one)

    def __call__(self, trial: Any) -> float:
        self.ran.append(trial.number)
        values = {d.key: d.suggest(trial) for d in self.dims}
        trial.set_user_attr("worker", self.worker)
        tracker = self._start_tracker(trial, values)
        out = self.work / f"trial-{trial.number:04d}-{self.worker}"
        state, status = "FAIL", "FAILED"
        try:
            try:
                p = trial_params(self.params, values)
            except LmopsError as e:
                trial.set_user_attr("error", str(e))
                raise _InvalidTrial(str(e)) from None
            result = train(self.data_dir, out, p.model, p.train, progress=False,
                           on_metrics=self._reporter(trial, tracker, p.train.max_steps),
                           dataset_version=self.dataset_version)
            if result.final_val_loss is None:
                raise _InvalidTrial("training produced no validation loss")
            state, status = "COMPLETE", "FINISHED"
            if tracker is not None:
                tracker.log_metrics(result.steps, {"final_val_loss": result.final_val_loss,
                                                   "final_train_loss": result.final_train_loss})
            return float(result.final_val_loss)
        except optuna.TrialPruned:
            state, status = "PRUNED", "KILLED"
            raise
        finally:
            shutil.rmtree(out, ignore_errors=True)  # trials search; `lmops run` trains the winner for real
            if tracker is not None:
                tracker.set_tags({"trial_state": state})
                tracker.finish(status)

    def _start_tracker(self, trial: Any, values: dict[str, Any]) -> Any:
        """The trial's nested MLflow run (None when the sweep is not tracked)."""
        if self.parent is None:
            return None

        tracker = RunTracker.start(
            self.params.registry.experiment, f"{self.study}-trial-{trial.number}", params=values,
            tags={"lmops.study": self.study, "lmops.trial": trial.number, "lmops.kind": "sweep-trial",
                  "lmops.dataset_version": self.dataset_version or "unknown"},
            parent_run_id=self.parent.run_id, system_metrics=False,
        )
        trial.set_user_attr("run_id", tracker.run_id)
        return tracker

    def _reporter(self, trial: Any, tracker: Any, max_steps: int) -> Callable[[int, dict[str, float]], None]:
        """Training's ``on_metrics``: log the step, pass it on, and prune a hopeless trial."""
        def report(step: int, metrics: dict[str, float]) -> None:
            if tracker is not None:
                tracker.log_metrics(step, metrics)
            if self.on_metrics is not None:
                self.on_metrics(trial.number, step, metrics)
            if "val_loss" in metrics:
                trial.report(float(metrics["val_loss"]), step)
                if step < max_steps and trial.should_prune():  # a finished trial counts
                    raise optuna.TrialPruned(f"pruned at step {step} (val_loss {metrics['val_loss']:.4f})")

        return report


def _summarize(study: Any, params: Any, name: str, storage_url: str, parent: Any, ran: list[int],
               seconds: float) -> SweepResult:
    """The study's outcome over all its trials (also those of earlier calls and other workers)."""
    all_trials = study.trials
    states = [t.state.name for t in all_trials]
    done = [t for t in all_trials if t.state.name == "COMPLETE"]
    best = min(done, key=lambda t: t.value) if done else None
    return SweepResult(
        study=name, storage=_redact(storage_url), parent_run_id=parent.run_id if parent else None,
        trials_run=len(ran), trials_total=len(all_trials), completed=states.count("COMPLETE"),
        pruned=states.count("PRUNED"), failed=states.count("FAIL"),
        best_value=best.value if best else None, best_params=derive(params, best.params) if best else {},
        best_trial=best.number if best else None, seconds=round(seconds, 3),
        trials=[_trial_row(t) for t in all_trials],
    )


class _InvalidTrial(Exception):
    """A sampled combination the params refuse (e.g. d_model not divisible by n_head): trial FAILs."""


def _redact(url: str) -> str:
    """Storage URL without a password, for tags and output."""
    if "://" in url and "@" in url.split("://", 1)[1]:
        scheme, rest = url.split("://", 1)
        creds, _, host = rest.rpartition("@")
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}"
    return url


def _finish_parent(parent: Any, study: Any, name: str, status: str, result: SweepResult | None = None) -> None:
    try:
        rows = [_trial_row(t) for t in study.trials]
        if rows:
            parent.log_text(trials_csv(rows), "trials.csv")
        if result is not None:
            parent.log_dict({"study": name, "best_trial": result.best_trial, "best_val_loss": result.best_value,
                             "best_params": result.best_params}, "best_params.json")
            summary = {"trials_total": result.trials_total, "trials_completed": result.completed,
                       "trials_pruned": result.pruned, "trials_failed": result.failed,
                       "sweep_seconds": result.seconds}
            if result.best_value is not None:
                summary["best_val_loss"] = result.best_value
            parent.log_summary(summary)
            parent.set_tags({f"best.{k}": v for k, v in result.best_params.items()})
    finally:
        parent.finish(status)


def apply_best(result: SweepResult, params_path: str | Path | None = None) -> list[tuple[str, Any, Any]]:
    """Write ``result.best_params`` into ``params.yaml`` (comments and order kept)."""
    if not result.best_params:
        raise LmopsError(f"study {result.study} has no completed trial: nothing to apply")
    if params_path is None:
        params_path = get_settings().params_path
    return apply_params(params_path, result.best_params)


__all__ = ["Dim", "SweepResult", "apply_best", "make_pruner", "resolve_data", "run_sweep", "trial_eval_interval",
           "trial_params", "trials_csv"]
