"""`lmops ui` and the local Prefect server: whatever starts Prefect lives here, in flows/.

``start_prefect_server`` runs `prefect server start` as a child process group (``lmcore.services`` starts,
health-waits and stops services, and starts the MLflow UI). In a fresh lmops home it first creates
Prefect's local database as its own announced step (``flows.prefect_home``), as `lmops run` does,
so the server is left only its ordinary start. `lmops schedule` reuses it.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import prefect.settings

from flows.prefect_home import prepare_prefect_database
from lmcore.errors import LmopsError
from lmcore.serve.limits import is_loopback
from lmcore.services import Service, check_port, console_script, log_tail, start_mlflow_ui, start_service, stop_service
from lmcore.settings import MLFLOW_PORT, PREFECT_PORT, apply_environment, get_settings

if TYPE_CHECKING:  # pragma: no cover
    from lmcore.settings import Settings


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def prepare_server_database(settings: Settings, echo: Callable[[str], None] = _stderr) -> float | None:
    """Create or upgrade the database the server will use, in this process, before it starts.

    Prefect's settings in this process are fixed when it is first imported; the database is prepared
    only when they name the server's own home (``settings.prefect_home``). Otherwise (or with
    PREFECT_API_URL set here) the server migrates its database itself on start, as before.
    Returns the seconds the migrations took, or None when nothing was done.
    """
    if prefect.settings.get_current_settings().home.resolve() != settings.prefect_home.resolve():
        return None
    return prepare_prefect_database(echo=echo)


def start_prefect_server(port: int = PREFECT_PORT, host: str = "127.0.0.1", settings: Settings | None = None,
                         timeout: float = 120.0, echo: Callable[[str], None] = _stderr,
                         database_url: str | None = None, env: dict[str, str] | None = None) -> Service:
    """`prefect server start` with PREFECT_HOME inside the lmops home and analytics off.

    Its local SQLite database is created first (``prepare_server_database``), with ``echo`` saying so on a
    first start; with ``database_url`` (PostgreSQL, the team stack) the server migrates that database itself.
    """
    settings = apply_environment(settings or get_settings())
    check_port(host, port, "prefect")
    settings.prefect_home.mkdir(parents=True, exist_ok=True)
    if database_url is None:
        prepare_server_database(settings, echo)
    cmd = [console_script("prefect"), "server", "start", "--host", host, "--port", str(port)]
    url = f"http://{host}:{port}"
    full_env = {"PREFECT_HOME": str(settings.prefect_home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "DO_NOT_TRACK": "1", "PREFECT_UI_API_URL": f"{url}/api", "PREFECT_API_URL": f"{url}/api",
                **({"PREFECT_API_DATABASE_CONNECTION_URL": database_url} if database_url else {}), **(env or {})}
    return start_service("prefect", cmd, url, f"{url}/api/health", settings.home / "logs" / "prefect-server.log",
                         env=full_env, timeout=timeout)


def run_uis(mlflow_port: int = MLFLOW_PORT, prefect_port: int | None = PREFECT_PORT, host: str = "127.0.0.1",
            echo: Callable[[str], None] = print, stop: threading.Event | None = None, open_to_network: bool = False
            ) -> None:
    """Start the UIs, print their URLs and block until Ctrl-C/SIGTERM (or a child dies); stop them all.

    Beyond loopback it refuses unless ``open_to_network``: neither UI authenticates, and whoever reaches
    MLflow's can move ``champion``, which a running server then follows.
    """
    if not is_loopback(host) and not open_to_network:
        raise LmopsError(f"binding {host} (beyond loopback) would open the MLflow and Prefect UIs to the network "
                         "with no authentication (anyone reaching them can move `champion`): bind 127.0.0.1 and "
                         f"use an SSH tunnel (ssh -L {MLFLOW_PORT}:127.0.0.1:{MLFLOW_PORT} -L {PREFECT_PORT}:"
                         f"127.0.0.1:{PREFECT_PORT} HOST), or pass --open-to-network behind an authenticating proxy")
    stop = stop or threading.Event()
    services: list[Service] = []
    previous = {}

    def _on_signal(signum, frame) -> None:  # noqa: ARG001
        stop.set()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, _on_signal)
    try:
        echo("starting MLflow UI ...")
        services.append(start_mlflow_ui(mlflow_port, host))
        echo(f"MLflow UI:  {services[-1].url}  (pid {services[-1].pid}, log {services[-1].log})")
        if prefect_port is not None and not stop.is_set():
            echo("starting Prefect server (this can take 10-20 s) ...")
            services.append(start_prefect_server(prefect_port, host, echo=echo))
            echo(f"Prefect UI: {services[-1].url}  (pid {services[-1].pid}, log {services[-1].log})")
        echo("press Ctrl-C to stop")
        while not stop.is_set():
            dead = [s for s in services if not s.alive()]
            if dead:
                raise LmopsError(f"{dead[0].name} exited with code {dead[0].proc.returncode} "
                                 f"({log_tail(dead[0].log)})")
            stop.wait(0.5)
    finally:
        for svc in reversed(services):
            stop_service(svc)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if services:
            echo("stopped " + ", ".join(f"{s.name} (pid {s.pid})" for s in services))
