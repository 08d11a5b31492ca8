"""`lmops stack up | status | down`: the team stack on one machine, everything bound to 127.0.0.1.

PostgreSQL (``lmcore.postgres``, data under ``<home>/stack``) holds four databases: the Prefect
server's, the MLflow server's (which proxies artifacts, so clients need no storage credentials),
the feedback store's and Optuna's. The Prefect server gets a process work pool, the deployments of
``prefect.yaml`` (``prefect deploy --all``), an automation that marks a flow run Crashed when its
heartbeats stop (a worker that died), and N workers. Flow results go to one folder every worker
shares. The environment a second machine needs (``client_env``) is printed as ``export`` lines;
``state.json`` records what was started (PIDs, URLs) so ``down`` stops exactly that, by PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import prefect.settings
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.exceptions import ObjectAlreadyExists

import flows
from flows.ui import start_prefect_server
from lmcore.config import Params
from lmcore.errors import LmopsError
from lmcore.postgres import Cluster
from lmcore.services import (
    Service,
    check_port,
    console_script,
    pid_alive,
    start_mlflow_server,
    start_service,
    stop_group,
)
from lmcore.settings import (
    MLFLOW_PORT,
    POSTGRES_PORT,
    PREFECT_PORT,
    RDZV_PORT,
    WORKER_HEALTH_PORT,
    apply_environment,
    get_settings,
)

WORK_POOL = "lmops"  # the pool prefect.yaml's deployments name
DATABASES = {"prefect": "lmops_prefect", "mlflow": "lmops_mlflow", "feedback": "lmops_feedback",
             "optuna": "lmops_optuna"}
CRASH_AUTOMATION = "lmops: mark flow runs crashed when their heartbeats stop"
CODE_ROOT = Path(flows.__file__).resolve().parents[1]  # where prefect.yaml and flows/ live


@dataclass(frozen=True)
class Ports:
    postgres: int = POSTGRES_PORT
    prefect: int = PREFECT_PORT
    mlflow: int = MLFLOW_PORT
    worker_health: int = WORKER_HEALTH_PORT
    rendezvous: int = RDZV_PORT


def stack_dir(home: Path | None = None) -> Path:
    return (home or get_settings().home) / "stack"


def state_path(home: Path | None = None) -> Path:
    return stack_dir(home) / "state.json"


def cluster(port: int, home: Path | None = None) -> Cluster:
    return Cluster(stack_dir(home) / "postgres", port)


def client_env(db: Cluster, ports: Ports, params: Params, host: str = "127.0.0.1") -> dict[str, str]:
    """What any machine needs to use the stack: the servers, the shared stores, the shared result folder."""
    return {
        "PREFECT_API_URL": f"http://{host}:{ports.prefect}/api",
        "MLFLOW_TRACKING_URI": f"http://{host}:{ports.mlflow}",
        "LMOPS_FEEDBACK_DB": db.url(DATABASES["feedback"]),
        "LMOPS_OPTUNA_DB": db.url(DATABASES["optuna"]),
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(stack_dir() / "results"),
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(params.stack.heartbeat_s),
        "LMOPS_RDZV_ENDPOINT": f"{host}:{ports.rendezvous}",
    }


def export_lines(env: dict[str, str]) -> str:
    return "\n".join(f"export {k}='{v}'" for k, v in env.items())


# --------------------------------------------------------------------------- state


def _record(svc: Service, health: str) -> dict[str, Any]:
    return {"name": svc.name, "url": svc.url, "health": health, "pid": svc.pid, "log": str(svc.log)}


def read_state(home: Path | None = None) -> dict[str, Any] | None:
    path = state_path(home)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise LmopsError(f"cannot read the stack state {path}: {e}") from None


def _write_state(state: dict[str, Any]) -> None:
    path = state_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.chmod(0o600)  # it holds the database URLs with their password
    tmp.replace(path)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=3).status_code == 200
    except httpx.HTTPError:
        return False


# --------------------------------------------------------------------------- up


def _prefect_setup(api_url: str, params: Params, workers: list[str]) -> None:
    """Work pool, one queue per worker (so `lmops doctor` can reach each), the crash automation."""
    with prefect.settings.temporary_settings(updates={prefect.settings.PREFECT_API_URL: api_url}), \
            get_client(sync_client=True) as client:
        with contextlib.suppress(ObjectAlreadyExists):
            client.create_work_pool(WorkPoolCreate(name=WORK_POOL, type="process"))
        for name in ["default", *workers]:
            with contextlib.suppress(ObjectAlreadyExists):
                client.create_work_queue(name=name, work_pool_name=WORK_POOL)
        if not any(a.name == CRASH_AUTOMATION for a in client.read_automations_by_name(CRASH_AUTOMATION)):
            client.create_automation(crash_automation(params.stack.crash_after_s))


def crash_automation(after_s: int) -> AutomationCore:
    """Prefect's documented zombie-run detector: a heartbeat not followed by another (or an end) in time."""
    ends = {f"prefect.flow-run.{s}" for s in ("Completed", "Failed", "Cancelled", "Crashed")}
    trigger = EventTrigger(
        after={"prefect.flow-run.heartbeat"}, expect={"prefect.flow-run.heartbeat", *ends},
        match={"prefect.resource.id": ["prefect.flow-run.*"]}, for_each={"prefect.resource.id"},
        posture=Posture.Proactive, threshold=1, within=timedelta(seconds=after_s),
    )
    action = ChangeFlowRunState(state=StateType.CRASHED,
                                message=f"no heartbeat for {after_s} s: its worker or machine died")
    return AutomationCore(name=CRASH_AUTOMATION, trigger=trigger, actions=[action], enabled=True)


def deploy(env: dict[str, str], schedules: bool = True) -> None:
    """`prefect deploy --all` of prefect.yaml against the stack; schedules paused unless ``schedules``."""
    cmd = [console_script("prefect"), "--no-prompt", "deploy", "--all",
           "--prefect-file", str(CODE_ROOT / "prefect.yaml")]
    proc = subprocess.run(cmd, cwd=CODE_ROOT, env={**os.environ, **env}, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=300)
    if proc.returncode != 0:
        tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
        raise LmopsError(f"prefect deploy --all failed: {tail[-400:]}")
    if schedules:
        return
    with prefect.settings.temporary_settings(updates={prefect.settings.PREFECT_API_URL: env["PREFECT_API_URL"]}), \
            get_client(sync_client=True) as client:
        for d in client.read_deployments():
            client.pause_deployment(d.id)


def _start_worker(i: int, name: str, ports: Ports, env: dict[str, str], host: str) -> Service:
    port = ports.worker_health + i
    cmd = [console_script("prefect"), "worker", "start", "--pool", WORK_POOL, "--name", name, "--type", "process",
           "--with-healthcheck", "--work-queue", "default", "--work-queue", name]
    url = f"http://{host}:{port}"
    return start_service(name, cmd, url, f"{url}/health", get_settings().home / "logs" / f"{name}.log",
                         env={**env, "PREFECT_WORKER_WEBSERVER_HOST": host, "PREFECT_WORKER_WEBSERVER_PORT": str(port)},
                         timeout=120)


def worker_env(env: dict[str, str]) -> dict[str, str]:
    """A worker's environment: the client's, plus this workspace and home (flow runs inherit it)."""
    settings = get_settings()
    return {**env, "LMOPS_WORKSPACE": str(settings.workspace), "LMOPS_HOME": str(settings.home),
            "PREFECT_CLI_PROMPT": "false"}


def start_workers(n: int, ports: Ports, env: dict[str, str], host: str = "127.0.0.1",
                  first: int = 1) -> list[Service]:
    names = [f"lmops-worker-{i}" for i in range(first, first + n)]
    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(_start_worker, i - 1, name, ports, worker_env(env), host)
                   for i, name in zip(range(first, first + n), names, strict=True)]
        return [f.result() for f in futures]


def _check_ports(ports: Ports, workers: int, host: str) -> None:
    check_port(host, ports.postgres, "postgres")
    check_port(host, ports.prefect, "prefect")
    check_port(host, ports.mlflow, "mlflow")
    for i in range(workers):
        check_port(host, ports.worker_health + i, "worker-health")


def stack_up(params: Params, workers: int | None = None, ports: Ports = Ports(), schedules: bool = True,
             host: str = "127.0.0.1", echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Start every part, health-checked, recording each in state.json as it comes up; stop them all on failure."""
    settings = apply_environment(get_settings())
    n = workers or params.stack.workers
    if (old := read_state()) and any(pid_alive(s["pid"]) for s in old.get("services", [])):
        raise LmopsError(f"a stack is already up (state {state_path()}): `lmops stack status`, `lmops stack down`")
    _check_ports(ports, n, host)
    db = cluster(ports.postgres)
    state: dict[str, Any] = {"home": str(settings.home), "ports": ports.__dict__, "services": [],
                             "postgres": {"data": str(db.data), "port": ports.postgres}}
    try:
        echo(f"PostgreSQL: {db.data} on {host}:{ports.postgres} ...")
        db.init()
        state["postgres"]["pid"] = db.start()
        db.ensure_databases(list(DATABASES.values()))
        _write_state(state)
        (stack_dir() / "results").mkdir(parents=True, exist_ok=True)
        (stack_dir() / "mlartifacts").mkdir(parents=True, exist_ok=True)
        echo("Prefect server and MLflow server (artifact proxy) on PostgreSQL ...")
        with ThreadPoolExecutor(2) as pool:
            pf = pool.submit(start_prefect_server, ports.prefect, host, settings, 300.0, echo,
                             db.url(DATABASES["prefect"], "asyncpg"))
            ml = pool.submit(start_mlflow_server, ports.mlflow, host, db.url(DATABASES["mlflow"]),
                             ["--serve-artifacts", "--artifacts-destination", str(stack_dir() / "mlartifacts")],
                             settings.home / "logs" / "mlflow-server.log", 120.0)
            for fut, health in ((pf, "/api/health"), (ml, "/health")):
                svc = fut.result()
                state["services"].append(_record(svc, svc.url + health))
                _write_state(state)
        env = client_env(db, ports, params, host)
        state["env"] = env
        names = [f"lmops-worker-{i}" for i in range(1, n + 1)]
        echo(f"work pool '{WORK_POOL}', deployments from prefect.yaml, crash detection ...")
        _prefect_setup(env["PREFECT_API_URL"], params, names)
        deploy(worker_env(env), schedules)
        echo(f"{n} worker(s) ...")
        for svc in start_workers(n, ports, env, host):
            state["services"].append(_record(svc, svc.url + "/health"))
        _write_state(state)
    except BaseException:
        with contextlib.suppress(Exception):
            stack_down(echo=lambda _m: None)
        raise
    return state


# --------------------------------------------------------------------------- status and down


def stack_status(home: Path | None = None) -> list[dict[str, Any]]:
    """Each recorded part: name, URL, PID, alive, healthy."""
    state = read_state(home)
    if state is None:
        return []
    pg = state["postgres"]
    db = Cluster(Path(pg["data"]), pg["port"])
    pid = db.pid()
    rows = [{"name": "postgres", "url": f"postgresql://127.0.0.1:{pg['port']}", "pid": pid,
             "alive": pid is not None, "healthy": pid is not None and db.healthy()}]
    for s in state.get("services", []):
        alive = pid_alive(s["pid"])
        rows.append({"name": s["name"], "url": s["url"], "pid": s["pid"], "alive": alive,
                     "healthy": alive and _healthy(s["health"])})
    return rows


def stack_down(home: Path | None = None, echo: Callable[[str], None] = print) -> list[str]:
    """Stop every recorded part, workers first, PostgreSQL last; returns what was stopped."""
    state = read_state(home)
    if state is None:
        return []
    stopped = []
    for s in reversed(state.get("services", [])):
        if pid_alive(s["pid"]):
            stop_group(s["pid"])
            stopped.append(f"{s['name']} (pid {s['pid']})")
    pg = state["postgres"]
    db = Cluster(Path(pg["data"]), pg["port"])
    pid = db.pid()
    if db.stop():
        stopped.append(f"postgres (pid {pid})")
    state_path(home).unlink(missing_ok=True)
    echo("stopped " + (", ".join(stopped) if stopped else "nothing (nothing was running)"))
    return stopped
