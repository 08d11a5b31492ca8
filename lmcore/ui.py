"""Starting and stopping the local UIs: the MLflow UI and a Prefect server, as child process groups.

Each service runs in its own session (process group) with its output in a log file under
``<home>/logs``; it counts as up once its health URL answers. Stopping sends SIGTERM to the
whole group (uvicorn/gunicorn workers included), then SIGKILL after a grace period, so no
orphan is left behind. The `schedule` verb reuses ``start_prefect_server``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lmcore.errors import LmopsError

if TYPE_CHECKING:  # pragma: no cover
    from lmcore.settings import Settings


@dataclass
class Service:
    """A started child: its name, public URL, process (group leader) and log file."""

    name: str
    url: str
    proc: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None


def _tool(name: str) -> str:
    """The console script installed next to this interpreter (the venv's), else whatever PATH finds."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 3) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])[-400:]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Poll ``url`` until it answers 200; LmopsError if the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    delay = 0.2
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise LmopsError(f"{url} did not come up: process exited with {proc.returncode}"
                             + (f" ({_tail(log)})" if log else ""))
        try:
            with urllib.request.urlopen(url, timeout=3) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(delay)
        delay = min(delay * 1.5, 1.0)
    raise LmopsError(f"{url} did not answer within {timeout:.0f} s" + (f" ({_tail(log)})" if log else ""))


def start_service(name: str, cmd: list[str], url: str, health_url: str, log: Path, *,
                  env: dict[str, str] | None = None, timeout: float = 60.0) -> Service:
    """Start ``cmd`` in a new process group, logging to ``log``; return once ``health_url`` answers."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})}, start_new_session=True)
    svc = Service(name=name, url=url, proc=proc, log=log)
    try:
        wait_http(health_url, timeout, proc, log)
    except BaseException:
        stop_service(svc)
        raise
    return svc


def stop_service(svc: Service, grace: float = 10.0) -> None:
    """SIGTERM the service's process group, SIGKILL it after ``grace`` seconds; reap the leader."""
    if svc.proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(svc.proc.pid, signal.SIGTERM)
        try:
            svc.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(svc.proc.pid, signal.SIGKILL)
            svc.proc.wait(timeout=5)
    # Workers may outlive a leader that exited on its own: sweep the group and wait until it is empty.
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        try:
            os.killpg(svc.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.05)


def _check_port(host: str, port: int, what: str) -> None:
    if not port_free(host, port):
        raise LmopsError(f"port {port} on {host} is already in use (choose another with --{what}-port)")


def start_mlflow_ui(port: int = 5000, host: str = "127.0.0.1", settings: Settings | None = None,
                    timeout: float = 60.0) -> Service:
    """`mlflow server` on the embedded sqlite store (one worker), artifacts under the lmops home."""
    from lmcore.settings import apply_environment, get_settings

    settings = apply_environment(settings or get_settings())
    uri = settings.mlflow_tracking_uri
    if uri.startswith(("http://", "https://")):
        raise LmopsError(f"MLFLOW_TRACKING_URI points at a server already: open {uri} (or unset it)")
    _check_port(host, port, "mlflow")
    settings.ensure()
    settings.mlflow_artifacts.mkdir(parents=True, exist_ok=True)
    cmd = [_tool("mlflow"), "server", "--host", host, "--port", str(port), "--workers", "1",
           "--backend-store-uri", uri, "--default-artifact-root", settings.mlflow_artifacts.as_uri()]
    url = f"http://{host}:{port}"
    return start_service("mlflow", cmd, url, f"{url}/health", settings.home / "logs" / "mlflow-ui.log",
                         env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, timeout=timeout)


def start_prefect_server(port: int = 4200, host: str = "127.0.0.1", settings: Settings | None = None,
                         timeout: float = 120.0) -> Service:
    """`prefect server start` with PREFECT_HOME inside the lmops home and analytics off."""
    from lmcore.settings import apply_environment, get_settings

    settings = apply_environment(settings or get_settings())
    _check_port(host, port, "prefect")
    settings.prefect_home.mkdir(parents=True, exist_ok=True)
    cmd = [_tool("prefect"), "server", "start", "--host", host, "--port", str(port)]
    url = f"http://{host}:{port}"
    env = {"PREFECT_HOME": str(settings.prefect_home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "1", "PREFECT_UI_API_URL": f"{url}/api", "PREFECT_API_URL": f"{url}/api"}
    return start_service("prefect", cmd, url, f"{url}/api/health", settings.home / "logs" / "prefect-server.log",
                         env=env, timeout=timeout)


def run_uis(mlflow_port: int = 5000, prefect_port: int | None = 4200, host: str = "127.0.0.1",
            echo: Callable[[str], None] = print, stop: threading.Event | None = None) -> None:
    """Start the UIs, print their URLs and block until Ctrl-C/SIGTERM (or a child dies); stop them all."""
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
            services.append(start_prefect_server(prefect_port, host))
            echo(f"Prefect UI: {services[-1].url}  (pid {services[-1].pid}, log {services[-1].log})")
        echo("press Ctrl-C to stop")
        while not stop.is_set():
            dead = [s for s in services if not s.alive()]
            if dead:
                raise LmopsError(f"{dead[0].name} exited with code {dead[0].proc.returncode} ({_tail(dead[0].log)})")
            stop.wait(0.5)
    finally:
        for svc in reversed(services):
            stop_service(svc)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if services:
            echo("stopped " + ", ".join(f"{s.name} (pid {s.pid})" for s in services))
