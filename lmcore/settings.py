"""Where lmops keeps its state, and the environment it runs in.

Everything lmops writes (MLflow store, Prefect home, DVC cache/remote, feedback DB, caches)
lives under one home folder: ``$LMOPS_HOME``, else ``<workspace>/.lmops``. The workspace is
``$LMOPS_WORKSPACE``, else the nearest folder upward holding ``params.yaml``, else the cwd.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

QUIET_ENV = {
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "GIT_PYTHON_REFRESH": "quiet",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # no "View run at ..." per run against a server
}

# The local web UIs' ports (each tool's own default), used by every command that starts or links to them.
MLFLOW_PORT = 5000  # `lmops ui`'s MLflow server
PREFECT_PORT = 4200  # the local Prefect server of `lmops ui` and `lmops schedule`
POSTGRES_PORT = 5433  # `lmops stack up`'s PostgreSQL (5432 is left to a system one)
WORKER_HEALTH_PORT = 8090  # `lmops stack up`'s first worker health endpoint; worker i uses this + i
RDZV_PORT = 29500  # torchrun's rendezvous (c10d) port, torch's own default


def find_workspace(start: Path | None = None) -> Path:
    if env := os.environ.get("LMOPS_WORKSPACE"):
        return Path(env).resolve()
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "params.yaml").is_file():
            return folder
    return here


@dataclass(frozen=True)
class Settings:
    workspace: Path
    home: Path

    @property
    def params_path(self) -> Path:
        return self.workspace / "params.yaml"

    @property
    def mlflow_tracking_uri(self) -> str:
        return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.home / 'mlflow.db'}"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.home / "mlartifacts"

    @property
    def prefect_home(self) -> Path:
        return Path(os.environ.get("PREFECT_HOME") or self.home / "prefect")

    @property
    def prefect_api_url(self) -> str | None:
        return os.environ.get("PREFECT_API_URL") or None

    @property
    def dvc_remote(self) -> Path:
        return self.home / "dvc-remote"

    @property
    def dvc_site_cache(self) -> Path:
        return self.home / "dvc-site-cache"

    @property
    def feedback_db(self) -> str:
        return os.environ.get("LMOPS_FEEDBACK_DB") or f"sqlite:///{self.home / 'feedback.db'}"

    @property
    def optuna_db(self) -> str:
        """Optuna's study storage when ``optimize.storage`` is empty: ``$LMOPS_OPTUNA_DB``, else SQLite here."""
        return os.environ.get("LMOPS_OPTUNA_DB") or f"sqlite:///{self.home / 'optuna.db'}"

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    @property
    def gx_dir(self) -> Path:
        return self.home / "gx"

    @property
    def inductor_cache(self) -> Path:
        """One per ATen vector ISA: Inductor's graph cache does not key on it, so C++ written for AVX2
        (under ``ATEN_CPU_CAPABILITY=avx2``) would be rebuilt for AVX-512 with 16-wide stores into
        8-wide loops, corrupting the heap (torch 2.13)."""
        return self.home / "cache" / "inductor" / (os.environ.get("ATEN_CPU_CAPABILITY", "").lower() or "native")

    @property
    def decode_cache(self) -> Path:
        """AOT-compiled decode steps (``lmcore.model.decode``), one library per model shape."""
        return self.home / "cache" / "decode"

    def ensure(self) -> Settings:
        self.home.mkdir(parents=True, exist_ok=True)
        return self


def get_settings() -> Settings:
    workspace = find_workspace()
    home = Path(os.environ.get("LMOPS_HOME") or workspace / ".lmops").resolve()
    return Settings(workspace=workspace, home=home)


def apply_environment(settings: Settings | None = None) -> Settings:
    """Telemetry off and every tool's home inside the lmops home. Call before importing them."""
    settings = settings or get_settings()
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if "PREFECT_HOME" not in os.environ:
        os.environ["PREFECT_HOME"] = str(settings.prefect_home)
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)  # Prefect will not create parents
    # Flow and task logs still reach the Prefect API (and UI) at INFO; the terminal stays quiet
    # unless `lmops -v` lowers the console handler's level.
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
    # Prefect waits 20 s for its ephemeral API server; on a busy 2-core machine a start takes ~25 s
    # (a first one ~45 s, creating the database), so a generous default, which the user's own wins over.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    os.environ.setdefault("MPLCONFIGDIR", str(settings.home / "matplotlib"))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(settings.inductor_cache))  # torch.compile's code cache
    return settings
