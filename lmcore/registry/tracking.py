"""MLflow tracking: client setup, runs with explicit ids, buffered metrics, lineage tags.

Every train/evaluate/gate step is one MLflow run. ``RunTracker`` talks to MLflow only
through an ``MlflowClient`` and an explicit run id, never the fluent thread-local active
run, so it is safe inside Prefect tasks and worker threads. Per-step metrics are buffered
and written with ``log_batch`` on a background thread (flushed every ``flush_every`` steps /
``flush_seconds`` and at ``finish``), which keeps tracking overhead on a training loop small.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmcore.errors import LmopsError
from lmcore.settings import apply_environment, get_settings

if TYPE_CHECKING:  # pragma: no cover
    import mlflow

    from lmcore.settings import Settings

MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_CHARS = 6000

# Lineage tag keys, shared by runs and model versions.
TAG_DATASET_VERSION = "lmops.dataset_version"
TAG_DATASET_GIT_REV = "lmops.dataset_git_rev"
TAG_PARAMS_HASH = "lmops.params_hash"
TAG_CODE_REV = "lmops.code_rev"
TAG_FLOW_RUN = "lmops.flow_run_id"
TAG_DEVICE = "lmops.device"
MODEL_DIR_ARTIFACT = "model_dir"  # the logged model folder, inside the pyfunc's artifacts
LINEAGE_KEYS = (TAG_DATASET_VERSION, TAG_DATASET_GIT_REV, TAG_PARAMS_HASH, TAG_CODE_REV, TAG_FLOW_RUN, TAG_DEVICE)

_configured: dict[str, str] = {}
_lock = threading.Lock()


def _is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _check_reachable(uri: str, retries: int, backoff: float) -> None:
    """GET <uri>/health with exponential backoff; one-line LmopsError when it never answers."""
    last = ""
    for attempt in range(retries + 1):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as resp:
                if resp.status == 200:
                    return
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            last = str(reason).splitlines()[0] if str(reason) else type(e).__name__
        if attempt < retries:
            time.sleep(backoff * (2**attempt))
    raise LmopsError(f"MLflow tracking server unreachable at {uri}: {last} (after {retries + 1} attempts)")


def configure_mlflow(settings: Settings | None = None) -> str:
    """Point MLflow's tracking and registry at lmops' store and return the tracking URI.

    The embedded default is ``sqlite:///<home>/mlflow.db``; ``MLFLOW_TRACKING_URI`` switches
    to a server, whose ``/health`` is checked with retry + exponential backoff
    (``LMOPS_MLFLOW_RETRIES``, default 4; ``LMOPS_MLFLOW_BACKOFF`` seconds, default 0.5).
    """
    settings = settings or get_settings()
    apply_environment(settings)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = settings.mlflow_tracking_uri
    with _lock:
        if _configured.get("uri") == uri:
            return uri
        if _is_remote(uri):
            retries = int(os.environ.get("LMOPS_MLFLOW_RETRIES", "4"))
            backoff = float(os.environ.get("LMOPS_MLFLOW_BACKOFF", "0.5"))
            _check_reachable(uri, retries, backoff)
        else:
            settings.ensure()
            settings.mlflow_artifacts.mkdir(parents=True, exist_ok=True)

        import mlflow  # lazy: MLflow imports in ~1.8 s

        # Alembic chatter on first sqlite use is noise for a CLI user.
        logging.getLogger("alembic").setLevel(logging.WARNING)
        # mlflow mirrors these into os.environ; restore them so the user's variables (read by
        # Settings) stay the only source of truth when the lmops home changes in one process.
        saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _configured["uri"] = uri
        _configured["artifacts"] = "" if _is_remote(uri) else settings.mlflow_artifacts.as_uri()
    return uri


def get_client() -> mlflow.MlflowClient:
    """An ``MlflowClient`` bound to the configured tracking + registry URI (configures on first use)."""
    from mlflow import MlflowClient  # lazy: MLflow imports in ~1.8 s

    uri = configure_mlflow()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(client: mlflow.MlflowClient, name: str) -> str:
    """Experiment id for ``name``; created with its artifacts under the lmops home (never ./mlruns)."""
    from mlflow.exceptions import MlflowException  # lazy: MLflow imports in ~1.8 s

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    artifacts = _configured.get("artifacts") or None
    location = f"{artifacts.rstrip('/')}/{name}" if artifacts else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created concurrently by another thread/process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def code_revision(cwd: Path | None = None) -> str:
    """``git rev-parse HEAD`` of the workspace (``+dirty`` when there are local changes), else "unknown"."""
    cwd = cwd or get_settings().workspace
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def current_flow_run_id() -> str | None:
    """The Prefect flow-run id when called inside a flow run (only if prefect is already imported)."""
    if "prefect" not in sys.modules:
        return None
    try:
        from prefect.runtime import flow_run  # lazy: only inside a flow run, where Prefect is imported already

        fid = flow_run.id
        return str(fid) if fid else None
    except Exception:  # noqa: BLE001 - outside a flow run prefect may raise anything
        return None


def lineage_tags(
    dataset_version: str | None,
    dataset_git_rev: str | None,
    params_hash: str,
    flow_run_id: str | None,
    device: str,
) -> dict[str, str]:
    """Tags naming what made a run / model version: data version, params, code, flow run, device."""
    flow_run_id = flow_run_id or current_flow_run_id()
    code = code_revision()
    tags = {
        TAG_DATASET_VERSION: dataset_version or "unknown",
        TAG_DATASET_GIT_REV: dataset_git_rev or "unknown",
        TAG_PARAMS_HASH: params_hash,
        TAG_CODE_REV: code,
        TAG_FLOW_RUN: flow_run_id or "none",
        TAG_DEVICE: device,
    }
    if code != "unknown":
        tags["mlflow.source.git.commit"] = code.removesuffix("+dirty")
    return tags


def _param_value(v: Any) -> str:
    s = json.dumps(v) if isinstance(v, list | tuple | dict) else str(v)
    return s if len(s) <= MAX_PARAM_CHARS else s[: MAX_PARAM_CHARS - 3] + "..."


class RunTracker:
    """One MLflow run addressed by id: params, buffered metrics, artifacts, dataset input."""

    def __init__(self, client: mlflow.MlflowClient, run_id: str, experiment_id: str, *,
                 flush_every: int = 1000, flush_seconds: float = 10.0):
        self.client = client
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self._buffer: list = []
        self._steps_since_flush = 0
        self._last_flush = time.monotonic()
        self._buf_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []
        self._sysmon = None
        self.finished = False

    # -- lifecycle -------------------------------------------------------------------------
    @classmethod
    def start(cls, experiment: str, run_name: str, params: dict, tags: dict,
              parent_run_id: str | None = None, *, system_metrics: bool = True) -> RunTracker:
        """Create a run in ``experiment`` (created on demand) with params and tags already logged."""
        client = get_client()
        exp_id = ensure_experiment(client, experiment)
        all_tags = {str(k): str(v) for k, v in (tags or {}).items()}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        all_tags.setdefault("mlflow.source.name", "lmops")
        all_tags.setdefault("mlflow.source.type", "LOCAL")
        run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
        tracker = cls(client, run.info.run_id, exp_id)
        tracker.log_params(params or {})
        if system_metrics:
            tracker._start_system_metrics()
        return tracker

    @classmethod
    def attach(cls, run_id: str) -> RunTracker:
        """A tracker for an existing run (e.g. one a flow created in another task)."""
        client = get_client()
        run = client.get_run(run_id)
        return cls(client, run_id, run.info.experiment_id)

    def _start_system_metrics(self) -> None:
        try:
            # lazy: optional: system metrics only where installed
            import psutil  # noqa: F401 - lazy: optional, system metrics only where installed
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        except ImportError:
            return
        interval = float(os.environ.get("LMOPS_SYSTEM_METRICS_INTERVAL", "10"))
        self._sysmon = SystemMetricsMonitor(self.run_id, sampling_interval=interval, samples_before_logging=1,
                                            tracking_uri=configure_mlflow())
        self._sysmon.start()

    def finish(self, status: str = "FINISHED") -> None:
        """Flush buffered metrics, stop system metrics and mark the run terminated (idempotent)."""
        if self.finished:
            return
        self.finished = True
        error: Exception | None = None
        try:
            self.flush(wait=True)
        except Exception as e:  # still terminate the run, then report
            error = e
        if self._sysmon is not None:
            with contextlib.suppress(Exception):  # system metrics are best effort
                self._sysmon.finish()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self.client.set_terminated(self.run_id, status="FAILED" if error else status)
        if error is not None:
            raise LmopsError(f"could not log metrics to MLflow run {self.run_id}: {error}") from None

    def __enter__(self) -> RunTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish("FAILED" if exc_type else "FINISHED")

    # -- params / tags / metrics ----------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param  # lazy: MLflow imports in ~1.8 s

        items = [Param(str(k), _param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + MAX_PARAMS_PER_BATCH])

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag  # lazy: MLflow imports in ~1.8 s

        items = [RunTag(str(k), str(v)) for k, v in tags.items()]
        if items:
            self.client.log_batch(self.run_id, tags=items)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Buffer one step's metrics (the ``on_metrics`` hook of ``train``); flushed in batches."""
        from mlflow.entities import Metric  # lazy: MLflow imports in ~1.8 s

        ts = int(time.time() * 1000)
        items = [Metric(str(k), float(v), ts, int(step)) for k, v in metrics.items()
                 if isinstance(v, int | float) and not isinstance(v, bool)]
        with self._buf_lock:
            self._buffer.extend(items)
            self._steps_since_flush += 1
            due = (self._steps_since_flush >= self.flush_every
                   or len(self._buffer) >= MAX_METRICS_PER_BATCH
                   or time.monotonic() - self._last_flush >= self.flush_seconds)
        if due:
            self.flush(wait=False)

    def log_summary(self, metrics: dict[str, Any], prefix: str = "", step: int = 0) -> None:
        """Log scalar metrics right away (evaluation results); non-finite values become tags."""
        flat = {f"{prefix}{k}": v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        bad = {k: v for k, v in flat.items() if not math.isfinite(float(v))}
        self.log_metrics(step, {k: v for k, v in flat.items() if k not in bad})
        if bad:
            self.set_tags({f"lmops.nonfinite.{k}": str(v) for k, v in bad.items()})
        self.flush(wait=True)

    def flush(self, wait: bool = True) -> None:
        """Hand buffered metrics to the background writer; ``wait`` blocks until written."""
        with self._buf_lock:
            batch, self._buffer = self._buffer, []
            self._steps_since_flush = 0
            self._last_flush = time.monotonic()
        if batch:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmops-mlflow")
            self._pending.append(self._pool.submit(self._write, batch))
        if wait:
            pending, self._pending = self._pending, []
            for f in pending:
                f.result()
        else:
            self._pending = [f for f in self._pending if not f.done() or f.exception() is not None]

    def _write(self, batch: list) -> None:
        for i in range(0, len(batch), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=batch[i : i + MAX_METRICS_PER_BATCH])

    # -- artifacts ---------------------------------------------------------------------------
    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        p = Path(local_path)
        if p.is_dir():
            self.client.log_artifacts(self.run_id, str(p), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(p), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_dict(self, obj: dict, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, obj, artifact_file)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file)

    def log_table(self, data: Any, artifact_file: str) -> None:
        """A table (dict of columns or DataFrame) as JSON that the MLflow UI's compare view reads."""
        self.client.log_table(self.run_id, data, artifact_file)

    def log_dataset_input(self, version: Any, path: str | Path, context: str = "training") -> None:
        """Record the DVC dataset version as an MLflow dataset input (source = DVC path @ git rev)."""
        from mlflow.data.meta_dataset import MetaDataset  # lazy: MLflow imports in ~1.8 s
        from mlflow.entities import DatasetInput, InputTag

        vid = getattr(version, "id", None) or (str(version) if version else "unknown")
        rev = getattr(version, "git_rev", None) or "unknown"
        source = DVCDatasetSource(path=str(path), rev=str(rev), version=str(vid))
        ds = MetaDataset(source=source, name=f"lmops-data@{str(vid)[:12]}", digest=str(vid)[:36])
        entity = ds._to_mlflow_entity()
        inputs = [DatasetInput(dataset=entity, tags=[InputTag("mlflow.data.context", context)])]
        for attempt in range(3):
            try:
                self.client.log_inputs(self.run_id, datasets=inputs)
                return
            except Exception as e:  # MLflow wraps the store's error in its own exception types
                # Two runs logging the same dataset at once: on PostgreSQL (not SQLite, whose writes queue)
                # the second INSERT violates the dataset's unique key; again, it finds the row and links it.
                if attempt == 2 or "unique" not in str(e).lower():
                    raise
                time.sleep(0.2 * (attempt + 1))


def _dvc_source_class():
    from mlflow.data.dataset_source import DatasetSource  # lazy: MLflow imports in ~1.8 s

    class _DVCDatasetSource(DatasetSource):
        """A dataset living in DVC: the tracked path, its git revision and content hash."""

        def __init__(self, path: str, rev: str, version: str):
            self.path, self.rev, self.version = path, rev, version

        @staticmethod
        def _get_source_type() -> str:
            return "dvc"

        def load(self, dst_path=None) -> str:  # pragma: no cover - reading back is the data registry's job
            return self.path

        @staticmethod
        def _can_resolve(raw_source: Any) -> bool:
            return isinstance(raw_source, str) and raw_source.startswith("dvc://")

        @classmethod
        def _resolve(cls, raw_source: Any):
            path, _, rev = raw_source.removeprefix("dvc://").partition("@")
            return cls(path=path, rev=rev or "unknown", version="unknown")

        def to_dict(self) -> dict[str, Any]:
            return {"uri": f"dvc://{self.path}@{self.rev}", "path": self.path, "rev": self.rev,
                    "dataset_version": self.version}

        @classmethod
        def from_dict(cls, d: dict[str, Any]):
            return cls(path=d["path"], rev=d["rev"], version=d.get("dataset_version", "unknown"))

    return _DVCDatasetSource


def DVCDatasetSource(path: str, rev: str, version: str):  # noqa: N802 - factory standing in for a class
    """Build a DVC dataset source (the class is created lazily so mlflow stays an on-demand import)."""
    global _DVC_CLS
    if _DVC_CLS is None:
        _DVC_CLS = _dvc_source_class()
    return _DVC_CLS(path=path, rev=rev, version=version)


_DVC_CLS = None
