"""`lmops doctor`: does this machine's configuration hold up as a team's? One line per check.

Checks what users of Prefect, MLflow and Optuna report breaking behind shared servers: SQLite behind
a shared server (the stores in this environment, and the backends of the Prefect and MLflow servers
when they run on this machine: read from their process), MLflow without its artifact proxy, a DVC
remote that cannot be written, workers on different code or torch, an unreachable rendezvous port,
and flow results written to one worker's own folder. The workers are checked by running the
``doctor`` deployment (``probe_flow``) once on each online worker's own queue: each run reports
its code revision, torch, CUDA, result folder and rendezvous reachability as an artifact, and leaves
a file in its result folder that this machine must see.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import prefect.settings
import torch
from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.deployments import run_deployment

from lmcore.config import Params
from lmcore.data.versions import DataRegistry, _quiet_dvc
from lmcore.registry.tracking import code_revision
from lmcore.settings import get_settings

CODE_ROOT = Path(__file__).resolve().parents[1]
PROBE_DEPLOYMENT = "doctor-probe/doctor"
WORK_POOL = "lmops"
PROBE_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'} {self.name}: {self.detail}"


# --------------------------------------------------------------------------- stores and servers


def _is_sqlite(url: str) -> bool:
    return url.startswith("sqlite") or url.startswith("file:") or "://" not in url


def _listener_pid(port: int) -> int | None:
    """The PID of the process listening on TCP ``port`` on this machine (via /proc), or None."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{f[9]}]")
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) in inodes for fd in fd_dir.iterdir()):
                return int(fd_dir.parent.name)
        except OSError:
            continue
    return None


def _process_environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return {}
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def server_backend(url: str, kind: str) -> str | None:
    """The database behind a Prefect or MLflow server on this machine, read from its process; None if remote."""
    parts = urlsplit(url)
    if parts.hostname not in ("127.0.0.1", "localhost", socket.gethostname()) or parts.port is None:
        return None
    pid = _listener_pid(parts.port)
    if pid is None:
        return None
    env = _process_environ(pid)
    if kind == "mlflow":
        return env.get("_MLFLOW_SERVER_FILE_STORE")
    return (env.get("PREFECT_API_DATABASE_CONNECTION_URL") or env.get("PREFECT_SERVER_DATABASE_CONNECTION_URL")
            or "sqlite+aiosqlite:///(Prefect's default, under its PREFECT_HOME)")


def _scheme(url: str) -> str:
    return "sqlite" if _is_sqlite(url) else url.split(":", 1)[0]


def check_no_sqlite(params: Params) -> Check:
    """No SQLite behind a shared server: every store, and each server's own database where it runs here."""
    s = get_settings()
    if not s.prefect_api_url and not s.mlflow_tracking_uri.startswith("http"):
        return Check("no SQLite behind a shared server", False, "no shared server configured (PREFECT_API_URL and "
                     "MLFLOW_TRACKING_URI unset): this is the one-machine setup; `lmops stack up` prints a team's")
    found: dict[str, str | None] = {}  # None: a server whose process is not on this machine
    if s.mlflow_tracking_uri.startswith("http"):
        found["mlflow server"] = server_backend(s.mlflow_tracking_uri, "mlflow")
    else:
        found["mlflow"] = s.mlflow_tracking_uri
    found["feedback"] = s.feedback_db
    found["optuna"] = params.optimize.storage or s.optuna_db
    if s.prefect_api_url:
        found["prefect server"] = server_backend(s.prefect_api_url, "prefect")
    bad = [name for name, url in found.items() if url is not None and _is_sqlite(url)]
    detail = ", ".join(f"{n}={_scheme(u) if u else 'not readable from here'}" for n, u in found.items())
    return Check("no SQLite behind a shared server", not bad,
                 f"SQLite in {', '.join(bad)} ({detail}): use PostgreSQL (`lmops stack up`)" if bad else detail)


def check_artifact_proxy(params: Params) -> Check:
    """MLflow serves artifacts itself (`--serve-artifacts`): clients need no storage credentials."""
    from mlflow import MlflowClient  # lazy: MLflow is slow to import

    uri = get_settings().mlflow_tracking_uri
    if not uri.startswith("http"):
        return Check("artifact proxy", False, f"MLFLOW_TRACKING_URI is {_scheme(uri)}, not a tracking server")
    try:
        httpx.get(f"{uri.rstrip('/')}/health", timeout=5).raise_for_status()  # fail fast: MLflow retries for minutes
        exps = MlflowClient(uri).search_experiments(max_results=50)
    except Exception as e:  # any transport or server error: one line
        return Check("artifact proxy", False, f"MLflow at {uri} does not answer: {str(e).splitlines()[0][:200]}")
    direct = [f"{e.name}: {e.artifact_location}" for e in exps
              if not e.artifact_location.startswith("mlflow-artifacts:")]
    if direct:
        return Check("artifact proxy", False, f"experiments store artifacts directly ({direct[0]}): clients need "
                     "that storage's credentials; start the server with --serve-artifacts")
    return Check("artifact proxy", True, f"{uri} proxies artifacts (mlflow-artifacts:/ for {len(exps)} experiments)")


def check_dvc_remote() -> Check:
    """Write, read back and delete a small file on the workspace's default DVC remote."""
    registry = DataRegistry.open()
    try:
        registry.ensure_initialized()
        repo = _quiet_dvc()(str(registry.workspace))
        remote = repo.cloud.get_remote()
        probe = remote.fs.join(remote.path, f".lmops-doctor-{secrets.token_hex(6)}")
        payload = secrets.token_bytes(16)
        remote.fs.makedirs(remote.path, exist_ok=True)
        remote.fs.pipe_file(probe, payload)
        ok = remote.fs.cat_file(probe) == payload
        remote.fs.rm_file(probe)
    except Exception as e:  # DVC and its filesystems raise many types
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        return Check("DVC remote", False, f"cannot write the remote: {why}")
    return Check("DVC remote", ok, f"'{remote.name}' at {remote.path}: written, read back, removed"
                 if ok else f"'{remote.name}' returned other bytes than written")


def rendezvous_reachable(endpoint: str) -> tuple[bool, str]:
    """A torchrun rendezvous host:port is usable here: free to bind where it is ours, else reachable."""
    host, _, port_s = endpoint.rpartition(":")
    try:
        port = int(port_s)
        addr = socket.gethostbyname(host)
    except (ValueError, OSError) as e:
        return False, f"{endpoint}: {e}"
    with socket.socket() as s:
        s.settimeout(3)
        try:
            s.connect((addr, port))
            return True, f"{endpoint}: a rendezvous store answers"
        except ConnectionRefusedError:  # host reachable, nothing listening yet: rank 0 will listen there
            pass
        except OSError as e:
            return False, f"{endpoint}: unreachable ({e})"
    try:
        with socket.socket() as s:
            s.bind((addr, port))
        return True, f"{endpoint}: free on this machine (rank 0 can listen)"
    except OSError:
        return True, f"{endpoint}: host reachable, port closed until rank 0 starts"


# --------------------------------------------------------------------------- workers


def results_dir() -> Path:
    return Path(prefect.settings.get_current_settings().results.local_storage_path).expanduser().resolve()


def worker_facts(nonce: str, name: str) -> dict[str, Any]:
    """What a worker's flow run sees: code, torch, CUDA, its result folder (a marker left in it), rendezvous."""
    folder = results_dir()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f".lmops-doctor-{nonce}-{name}").write_text(socket.gethostname())
    rdzv = os.environ.get("LMOPS_RDZV_ENDPOINT")
    return {
        "worker": name, "host": socket.gethostname(), "code_rev": code_revision(CODE_ROOT),
        "torch": torch.__version__, "cuda": torch.cuda.is_available(), "cuda_devices": torch.cuda.device_count(),
        "results": str(folder), "persist": prefect.settings.get_current_settings().results.persist_by_default,
        "rendezvous": rendezvous_reachable(rdzv) if rdzv else (False, "LMOPS_RDZV_ENDPOINT unset"),
    }


@flow(name="doctor-probe")
def probe_flow(nonce: str, worker: str) -> dict[str, Any]:
    """Run on one worker's queue by `lmops doctor`; its facts go into an artifact of this run."""
    facts = worker_facts(nonce, worker)
    create_markdown_artifact(markdown=json.dumps(facts), description=f"lmops doctor probe of {worker}")
    return facts


def probe_workers(nonce: str, timeout_s: float = PROBE_TIMEOUT_S) -> dict[str, dict[str, Any] | str]:
    """Per online worker of the pool: its probe's facts, or why there are none."""
    out: dict[str, dict[str, Any] | str] = {}
    runs = {}
    with get_client(sync_client=True) as client:
        workers = [w.name for w in client.read_workers_for_work_pool(WORK_POOL) if str(w.status).endswith("ONLINE")]
        for name in workers:
            try:
                runs[name] = run_deployment(PROBE_DEPLOYMENT, parameters={"nonce": nonce, "worker": name},
                                            work_queue_name=name, timeout=0, tags=["lmops-doctor"]).id
            except Exception as e:  # no such deployment or queue: say so on the worker's line
                out[name] = f"cannot start the probe: {str(e).splitlines()[0][:200]}"
        deadline = time.monotonic() + timeout_s
        while runs and time.monotonic() < deadline:
            time.sleep(1.0)
            for name, run_id in list(runs.items()):
                run = client.read_flow_run(run_id)
                if run.state and run.state.is_final():
                    arts = client.read_artifacts(artifact_filter=ArtifactFilter(
                        flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
                    facts = [a.data for a in arts if a.type == "markdown" and isinstance(a.data, str)]
                    out[name] = json.loads(facts[0]) if facts else f"probe run ended {run.state.name}"
                    runs.pop(name)
    for name in runs:
        out[name] = (f"did not run the probe within {timeout_s:.0f} s (start it with "
                     f"`--work-queue default --work-queue {name}`)")
    return out


def _same(name: str, key: str, facts: dict[str, dict[str, Any]], mine: Any) -> Check:
    values = {w: f[key] for w, f in facts.items()}
    distinct = set(values.values()) | {mine}
    if len(distinct) == 1:
        return Check(name, True, f"{mine} on this machine and {len(values)} worker(s)")
    return Check(name, False, f"this machine {mine}; " + ", ".join(f"{w} {v}" for w, v in values.items()))


def worker_checks(params: Params, probed: dict[str, dict[str, Any] | str], nonce: str) -> list[Check]:
    """Same code revision and torch everywhere, CUDA where train.device asks for it, shared results."""
    broken = {w: why for w, why in probed.items() if isinstance(why, str)}
    facts = {w: f for w, f in probed.items() if isinstance(f, dict)}
    if not probed:
        return [Check("workers", False, f"no online worker in work pool '{WORK_POOL}' (`lmops stack up`)")]
    why = "".join(f"; {w}: {m}" for w, m in broken.items())
    checks = [Check("workers", not broken, f"{len(facts)} answered{why}")]
    if not facts:
        return checks
    checks.append(_same("same git revision", "code_rev", facts, code_revision(CODE_ROOT)))
    checks.append(_same("same torch", "torch", facts, torch.__version__))
    want_cuda = params.train.device.startswith("cuda")
    no_cuda = [w for w, f in facts.items() if not f["cuda"]]
    seen = ", ".join(f"{w}: {f['cuda_devices']} CUDA device(s)" for w, f in facts.items())
    checks.append(Check("CUDA where expected", not (want_cuda and no_cuda),
                        f"train.device={params.train.device}; {seen}"))
    rdzv = [f"{w}: {f['rendezvous'][1]}" for w, f in facts.items() if not f["rendezvous"][0]]
    checks.append(Check("rendezvous from workers", not rdzv, "; ".join(rdzv) or "every worker reaches it"))
    mine = results_dir()
    missing = [w for w in facts if not (mine / f".lmops-doctor-{nonce}-{w}").is_file()]
    elsewhere = [f"{w}: {f['results']}" for w, f in facts.items() if Path(f["results"]) != mine]
    for marker in mine.glob(f".lmops-doctor-{nonce}-*"):
        marker.unlink(missing_ok=True)
    ok = not missing and not elsewhere and all(f["persist"] for f in facts.values())
    checks.append(Check("result storage shared", ok, f"{mine}: every worker's results land here" if ok else
                        f"results not shared with this machine ({'; '.join(elsewhere) or ', '.join(missing)})"))
    return checks


def check_result_storage() -> Check:
    """This machine's flow results go to a configured shared folder, not the default under its own home."""
    configured = os.environ.get("PREFECT_RESULTS_LOCAL_STORAGE_PATH") or os.environ.get("PREFECT_LOCAL_STORAGE_PATH")
    persist = prefect.settings.get_current_settings().results.persist_by_default
    ok = bool(configured) and persist
    return Check("result storage configured", ok, f"{results_dir()}, persisted by default" if ok else
                 "flow results go to this machine's own folder (set PREFECT_RESULTS_LOCAL_STORAGE_PATH to a shared "
                 "one and PREFECT_RESULTS_PERSIST_BY_DEFAULT=true: `lmops stack env`)")


def run_doctor(params: Params, workers: bool = True) -> list[Check]:
    """Every check, in order; the worker checks run the probe deployment on each online worker."""
    checks = [check_no_sqlite(params), check_artifact_proxy(params), check_dvc_remote()]
    rdzv = os.environ.get("LMOPS_RDZV_ENDPOINT")
    ok, detail = rendezvous_reachable(rdzv) if rdzv else (False, "LMOPS_RDZV_ENDPOINT unset (`lmops stack env`)")
    checks += [Check("rendezvous port", ok, detail), check_result_storage()]
    if workers:
        if not get_settings().prefect_api_url:
            checks.append(Check("workers", False, "PREFECT_API_URL unset: no work pool to probe"))
        else:
            nonce = secrets.token_hex(6)
            try:
                httpx.get(f"{get_settings().prefect_api_url.rstrip('/')}/health", timeout=5).raise_for_status()
                probed = probe_workers(nonce)
            except Exception as e:  # an unreachable or failing API: one line, not a traceback
                why = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                checks.append(Check("workers", False, f"the Prefect API does not answer: {why}"))
            else:
                checks += worker_checks(params, probed, nonce)
    return checks
