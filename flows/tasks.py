"""Prefect tasks: each a thin wrapper over one lmcore function.

Tasks pass paths, ids and content hashes, never large objects. The expensive steps
(prepare, train, evaluate) are cached on what DVC's stages depend on: the dataset version
(DVC's hash of the data), the hash of the params slices the step reads, and the hash of the
lmcore source files that do the work. The flow
re-runs a cached step whose output folder has since been deleted (see
``flows.training.run_cached``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import os
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
from prefect import task
from prefect.cache_policies import CacheKeyFnPolicy, CachePolicy
from prefect.context import TaskRunContext
from prefect.locking.filesystem import FileSystemLockManager
from prefect.logging import get_run_logger
from prefect.tasks import exponential_backoff

from lmcore.config import Params
from lmcore.data.ingest import ingest
from lmcore.data.prepare import params_tokenizer, prepare_dataset, prepare_key, prepared_dir, training_kinds
from lmcore.data.versions import TEXT_KINDS, DataRegistry
from lmcore.errors import LmopsError
from lmcore.model.base import TAG_BASE_HASH, base_lineage
from lmcore.registry.models import find_version_by_tag, gate, log_model, register_version
from lmcore.registry.reports import log_training_outputs
from lmcore.registry.tracking import TAG_DATASET_VERSION, RunTracker
from lmcore.services import pid_alive
from lmcore.settings import get_settings
from lmcore.training.dpo import train_dpo
from lmcore.training.evaluate import evaluate
from lmcore.training.loop import train
from lmcore.training.stages import STAGE_CODE, STAGE_PARAMS

CACHED: dict[str, Any] = {"cache_expiration": timedelta(days=30), "persist_result": True}


class OwnedFileLockManager(FileSystemLockManager):
    """Prefect's file locks, each with its owner (host and PID) beside it: a lock whose owner on this host
    has died (a killed worker's run) is stale and is removed, so the re-run does not wait for it forever."""

    def _get_lock_info(self, key: str, use_cache: bool = True):
        """Prefect's reading of a lock file, again while another flow is still writing it: Prefect creates
        the file, then writes its JSON, and a reader in between got an empty file (``EOF while parsing``),
        which failed a run that only had to wait (two runs at once, tests/test_flows.py)."""
        for _ in range(100):
            try:
                return super()._get_lock_info(key, use_cache)
            except ValueError:
                time.sleep(0.01)
        return super()._get_lock_info(key, use_cache)

    def _owner_path(self, key: str) -> Path:
        return self._lock_path_for_key(key).with_suffix(".owner")

    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                     hold_timeout: float | None = None) -> bool:
        acquired = super().acquire_lock(key, holder, acquire_timeout, hold_timeout)
        if acquired:
            self._owner_path(key).write_text(f"{socket.gethostname()} {os.getpid()}")
        return acquired

    async def aacquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                            hold_timeout: float | None = None) -> bool:
        acquired = await super().aacquire_lock(key, holder, acquire_timeout, hold_timeout)
        if acquired:
            self._owner_path(key).write_text(f"{socket.gethostname()} {os.getpid()}")
        return acquired

    def release_lock(self, key: str, holder: str) -> None:
        self._owner_path(key).unlink(missing_ok=True)
        super().release_lock(key, holder)

    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        with contextlib.suppress(OSError, ValueError):
            owner, lock = self._owner_path(key), self._lock_path_for_key(key)
            host, pid = owner.read_text().split()
            # an owner file older than the lock file is a previous holder's, not this lock's
            if (host == socket.gethostname() and not pid_alive(int(pid))
                    and owner.stat().st_mtime_ns >= lock.stat().st_mtime_ns):
                self._lock_path_for_key(key).unlink(missing_ok=True)
                self._owner_path(key).unlink(missing_ok=True)
                self._locks.pop(key, None)
        return super().is_locked(key, use_cache)


def _serializable(key_fn) -> CachePolicy:
    """Cache on ``key_fn``; a second run with the same key waits for the first, then reuses it."""
    locks = OwnedFileLockManager(lock_files_directory=get_settings().home / "locks" / "prefect")
    return CacheKeyFnPolicy(cache_key_fn=key_fn).configure(isolation_level="SERIALIZABLE", lock_manager=locks)


# The modules each step runs and the params slices it reads: the lists dvc.yaml's deps and params name too.
PREPARE_CODE, TRAIN_CODE, EVALUATE_CODE = STAGE_CODE["prepare"], STAGE_CODE["train"], STAGE_CODE["evaluate"]


def _hash(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


@functools.cache
def source_hash(*modules: str) -> str:
    """Hash of the modules' source: changed code is a cache miss, as it is a DVC deps change."""
    h = hashlib.sha256()
    for name in modules:
        h.update(Path(importlib.import_module(name).__file__).read_bytes())
    return h.hexdigest()[:16]


def train_key(version: str, params: Params, kinds: tuple[str, ...] = TEXT_KINDS) -> str:
    base = base_lineage(params.model.base)[TAG_BASE_HASH] if params.model.base else ""  # a base's files, not its name
    return _hash("train", prepare_key(version, params, kinds), source_hash(*PREPARE_CODE),
                 params.slice_hash(*STAGE_PARAMS["train"]), source_hash(*TRAIN_CODE), base)


def train_dir(version: str, params: Params, kinds: tuple[str, ...] = TEXT_KINDS) -> Path:
    return get_settings().runs_dir / "train" / train_key(version, params, kinds)


def _prepare_cache_key(ctx: TaskRunContext, p: dict[str, Any]) -> str:
    return f"prepare-{prepare_key(p['version'], p['params'], tuple(p['kinds']))}-{source_hash(*PREPARE_CODE)}"


def _train_cache_key(ctx: TaskRunContext, p: dict[str, Any]) -> str:
    return f"train-{train_key(p['dataset']['version'], p['params'], tuple(p['dataset']['kinds']))}"


def say_and_log(line: str) -> None:
    """A line for the terminal and for the task run's log in the Prefect UI."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    get_run_logger().info(line)


@task(name="ingest")
def ingest_task(sources: list[str], params: Params, sources_named: bool = True) -> dict[str, Any]:
    """Read, clean, validate (GX) and version the sources; returns the current dataset version and the
    record kinds training reads from it (:func:`lmcore.data.prepare.training_kinds`).

    ``sources_named`` False means ``sources`` are params' defaults: a base with chat data in the registry
    then ingests nothing and fine-tunes on that data (``ingested`` False says so)."""
    registry = DataRegistry.open()
    current = registry.current()
    if not sources_named and current is not None and training_kinds(current, params) != TEXT_KINDS:
        sources = []  # a base fine-tunes on the chat data already there: the default corpus is not wanted
    result = ingest(sources, params.data, registry=registry, progress=False) if sources else None
    current = registry.current()
    if current is None:
        raise LmopsError("no dataset version: ingest accepted no records and the registry is empty")
    return {
        "version": current.id,
        "git_rev": current.git_rev,
        "new_version": result.version if result else None,
        "rows": result.rows if result else 0,
        "accepted": result.accepted if result else 0,
        "quarantined": result.quarantined if result else 0,
        "refusals": list(result.refusals) if result else [],
        "ingested": result is not None,
        "kinds": list(training_kinds(current, params, sources_named)),
        "rows_by_kind": dict(current.rows_by_kind),
    }


@task(name="prepare", cache_policy=_serializable(_prepare_cache_key), **CACHED)
def prepare_task(version: str, params: Params, kinds: list[str]) -> str:
    """Tokenizer + deterministic split + memmaps for one dataset version (records of ``kinds``)."""
    out = prepared_dir(version, params, tuple(kinds))
    records = DataRegistry.open().iter_records(version, tuple(kinds))
    prepare_dataset(records, out, params.tokenizer, params.prepare, dataset_version=version,
                    tokenizer=params_tokenizer(params), extra={"kinds": list(kinds)})
    return str(out)


@task(name="train", cache_policy=_serializable(_train_cache_key), **CACHED)
def train_task(data_dir: str, dataset: dict[str, Any], params: Params, lineage: dict[str, str]) -> dict[str, Any]:
    """Train one model inside its own MLflow run (explicit run id, thread-safe); the run stays open."""
    version = dataset["version"]
    out = train_dir(version, params, tuple(dataset["kinds"]))
    tracker = RunTracker.start(
        params.registry.experiment, run_name=f"train-{out.name[:8]}", params=params.flat(), tags=lineage
    )
    try:
        tracker.log_dataset_input(SimpleNamespace(id=version, git_rev=dataset.get("git_rev")), "data")
        result = train(
            Path(data_dir), out, params.model, params.train,
            progress=True, on_metrics=tracker.log_metrics, dataset_version=version, say=say_and_log,
        )
        # what `auto` resolved to on this machine, beside the params that said `auto`
        tracker.log_params({f"resolved.{k}": v for k, v in result.choices.items()})
        if (result.out_dir / "adapter").is_dir():  # LoRA: the adapter alone, beside the merged model
            tracker.log_artifact(result.out_dir / "adapter", "adapter")
        tracker.flush()
    except BaseException:
        tracker.finish("FAILED")
        raise
    return {
        "out_dir": str(out),
        "model_dir": str(result.model_dir),
        "history_csv": str(result.history_csv),
        "run_id": tracker.run_id,
        "train_key": out.name,
        "steps": result.steps,
        "seconds": round(result.seconds, 2),
        "stopped_by": result.stopped_by,
        "choices": result.choices,
    }


def _evaluate_cache_key(ctx: TaskRunContext, p: dict[str, Any]) -> str:
    evaluated = p["params"].slice_hash(*STAGE_PARAMS["evaluate"])
    logged = "adapter" if p["params"].registry.adapter_only else "weights"  # what log_model uploads
    return f"evaluate-{p['trained']['run_id']}-{evaluated}-{logged}-{source_hash(*EVALUATE_CODE)}"


@task(name="evaluate", cache_policy=_serializable(_evaluate_cache_key), **CACHED)
def evaluate_task(trained: dict[str, Any], data_dir: str, params: Params, lineage: dict[str, str]) -> dict[str, Any]:
    """Metrics, samples, loss curve, model card and the pyfunc model, into the training run; closes it."""
    out = Path(trained["out_dir"]) / "eval.json"
    tmp = out.with_suffix(".tmp.json")
    metrics = evaluate(Path(trained["model_dir"]), Path(data_dir), params.eval, out_path=tmp, say=say_and_log)
    tracker = RunTracker.attach(trained["run_id"])
    try:
        log_training_outputs(
            tracker, model_dir=Path(trained["model_dir"]), metrics=metrics, history_csv=Path(trained["history_csv"]),
            params=params, dataset_version=lineage.get(TAG_DATASET_VERSION), lineage=lineage,
        )
        adapter = Path(trained["out_dir"]) / "adapter"
        model_uri = log_model(tracker, Path(trained["model_dir"]),
                              adapter if params.registry.adapter_only and adapter.is_dir() else None)
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish("FINISHED")
    tmp.replace(out)  # the cache key honours eval.json only once everything above is logged
    numbers = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
    return {"metrics": numbers, "model_uri": model_uri}


def dpo_key(sft_uri: str, version: str, params: Params) -> str:
    """Names a DPO run: the SFT model, the dataset version of its pairs, the dpo params and code."""
    return _hash("dpo", sft_uri, version, params.slice_hash("dpo"), source_hash("lmcore.training.dpo"))


def write_dpo_history(path: Path, losses: tuple[float, ...]) -> Path:
    """The DPO losses as a training history.csv (the columns ``log_training_outputs`` plots)."""
    rows = ["step,train_loss,val_loss,lr,tokens_per_s"] + [f"{i + 1},{v:.6f},,," for i, v in enumerate(losses)]
    path.write_text("\n".join(rows) + "\n")
    return path


@task(name="dpo", cache_policy=_serializable(lambda ctx, p: f"dpo-{p['key']}"), **CACHED)
def dpo_task(sft: dict[str, Any], pairs: list[dict], key: str, params: Params, lineage: dict[str, str]
             ) -> dict[str, Any]:
    """DPO from the SFT model ``sft`` ({uri, dir}) on the pairs, inside its own MLflow run (left open)."""
    out = get_settings().runs_dir / "dpo" / key
    tracker = RunTracker.start(params.registry.experiment, run_name=f"dpo-{key[:8]}", params=params.flat(),
                               tags={**lineage, "lmops.kind": "dpo", "lmops.sft_model": sft["uri"]})
    try:
        res = train_dpo(Path(sft["dir"]), pairs, params.dpo, out,
                        meta={"dataset_version": lineage.get(TAG_DATASET_VERSION), "sft_model": sft["uri"]})
        tracker.log_summary({"first_loss": res.first_loss, "final_loss": res.final_loss,
                             **{f"{k}_before": v for k, v in res.before.items()},
                             **{f"{k}_after": v for k, v in res.after.items()}}, prefix="dpo/")
    except BaseException:
        tracker.finish("FAILED")
        raise
    return {"out_dir": str(out), "model_dir": str(res.model_dir), "run_id": tracker.run_id, "train_key": f"dpo-{key}",
            "history_csv": str(write_dpo_history(out / "history.csv", res.losses)), "steps": res.steps,
            "before": res.before, "after": res.after}


@task(name="register", retries=3, retry_delay_seconds=exponential_backoff(2))
def register_task(trained: dict[str, Any], model_uri: str, params: Params, lineage: dict[str, str]) -> dict[str, Any]:
    """One registered version per trained model: a cached re-run finds and reuses it."""
    name = params.registry.model_name
    existing = find_version_by_tag(name, "lmops.train_key", trained["train_key"])
    if existing is not None:
        return {"version": existing, "reused": True}
    tags = {**lineage, "lmops.train_key": trained["train_key"]}
    return {"version": register_version(model_uri, name, tags, trained["run_id"]), "reused": False}


@task(name="gate")
def gate_task(registered: dict[str, Any], data_dir: str, params: Params) -> dict[str, Any]:
    """Challenger vs champion on the same validation set; moves `champion` only on a pass.

    A re-run that reused the version already serving as champion has nothing to decide: the
    gate itself says so (``promoted: False``, see ``lmcore.registry.gate``). The gate scores both
    versions itself (or reads their recorded numbers), so the evaluate task's metrics are not passed.
    """
    return gate(params.registry.model_name, registered["version"], Path(data_dir), params, say=say_and_log).to_dict()


@task(name="deploy", retries=3, retry_delay_seconds=exponential_backoff(1))
def deploy_task(decision: dict[str, Any], params: Params) -> str:
    """Tell a running server to load the new champion, or record that none runs."""
    if not decision.get("promoted"):
        return "champion unchanged: nothing to deploy"
    url = os.environ.get("LMOPS_SERVE_URL") or f"http://{params.serve.host}:{params.serve.port}"
    try:
        httpx.get(f"{url}/health", timeout=2.0)
    except httpx.TransportError:
        return f"no server running at {url}: `lmops serve` will load the new champion when started"
    headers = {}
    if token := os.environ.get("LMOPS_API_TOKEN"):
        headers["Authorization"] = f"Bearer {token}"
    r = httpx.post(f"{url}/admin/reload", headers=headers, timeout=120.0)
    r.raise_for_status()
    return f"server at {url} now serves version {r.json().get('version', decision.get('challenger'))}"
