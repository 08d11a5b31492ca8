"""Local services as child process groups (start, health-wait, stop), and the MLflow UI.

Each service runs in its own session (process group) with its output in a log file under
``<home>/logs``; it counts as up once its health URL answers. Stopping sends SIGTERM to the
whole group (uvicorn/gunicorn workers included), then SIGKILL after a grace period, so no
orphan is left behind. Whatever starts Prefect lives in flows/: ``flows.ui`` has the Prefect
server and `lmops ui` (both UIs together), built on these functions.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lmcore.errors import LmopsError
from lmcore.settings import MLFLOW_PORT, apply_environment, get_settings

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


def console_script(name: str) -> str:
    """The console script installed next to this interpreter (the venv's), else whatever PATH finds."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


def log_tail(path: Path, n: int = 3) -> str:
    """The last ``n`` non-blank lines of a log, on one line (for an error message)."""
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
                             + (f" ({log_tail(log)})" if log else ""))
        try:
            with urllib.request.urlopen(url, timeout=3) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(delay)
        delay = min(delay * 1.5, 1.0)
    raise LmopsError(f"{url} did not answer within {timeout:.0f} s" + (f" ({log_tail(log)})" if log else ""))


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


def stop_group(pid: int, grace: float = 10.0) -> None:
    """Stop a process group known only by its leader's PID (one another process started): SIGTERM, then
    SIGKILL what is left after ``grace`` seconds; returns once the group is empty."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except (ProcessLookupError, PermissionError):
                return
            time.sleep(0.1)


def check_port(host: str, port: int, what: str) -> None:
    """LmopsError naming the --WHAT-port option when ``port`` is taken."""
    if not port_free(host, port):
        raise LmopsError(f"port {port} on {host} is already in use (choose another with --{what}-port)")


def start_mlflow_server(port: int, host: str, backend_uri: str, artifacts: list[str], log: Path,
                        timeout: float = 60.0) -> Service:
    """`mlflow server` (one worker, no job runner) on ``backend_uri``; ``artifacts`` are its artifact options."""
    cmd = [console_script("mlflow"), "server", "--host", host, "--port", str(port), "--workers", "1",
           "--backend-store-uri", backend_uri, *artifacts]
    url = f"http://{host}:{port}"
    return start_service("mlflow", cmd, url, f"{url}/health", log,
                         env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, timeout=timeout)


def start_mlflow_ui(port: int = MLFLOW_PORT, host: str = "127.0.0.1", settings: Settings | None = None,
                    timeout: float = 60.0) -> Service:
    """`mlflow server` on the embedded sqlite store, artifacts under the lmops home."""
    settings = apply_environment(settings or get_settings())
    uri = settings.mlflow_tracking_uri
    if uri.startswith(("http://", "https://")):
        raise LmopsError(f"MLFLOW_TRACKING_URI points at a server already: open {uri} (or unset it)")
    check_port(host, port, "mlflow")
    settings.ensure()
    settings.mlflow_artifacts.mkdir(parents=True, exist_ok=True)
    return start_mlflow_server(port, host, uri, ["--default-artifact-root", settings.mlflow_artifacts.as_uri()],
                               settings.home / "logs" / "mlflow-ui.log", timeout)
