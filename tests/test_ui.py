"""`lmops ui` starts the MLflow and Prefect UIs, serves both pages, and stops both children on a signal."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.code, pytest.mark.slow]


def _read_until(proc: subprocess.Popen, pattern: str, timeout: float, seen: list[str]) -> re.Match:
    """Wait for a line matching ``pattern`` among those a reader thread collects into ``seen``."""
    deadline = time.monotonic() + timeout
    rx = re.compile(pattern)
    while time.monotonic() < deadline:
        for line in list(seen):
            if m := rx.search(line):
                return m
        if proc.poll() is not None and not any(rx.search(x) for x in seen):
            time.sleep(0.2)
            break
        time.sleep(0.2)
    raise AssertionError(f"no line matching {pattern!r} (exit {proc.poll()}): {''.join(seen)[-2000:]}")


def _collect(proc: subprocess.Popen, seen: list[str]) -> None:
    threading.Thread(target=lambda: [seen.append(line) for line in proc.stdout], daemon=True).start()


@pytest.mark.parametrize("sig", [signal.SIGINT])
def test_lmops_ui_serves_both_and_stops_children(tmp_path, sig):
    from lmcore.ui import free_port

    mport, pport = free_port(), free_port()
    env = {**os.environ, "LMOPS_HOME": str(tmp_path / "home"), "PREFECT_HOME": str(tmp_path / "home" / "prefect"),
           "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PREFECT_API_URL", None)
    lmops = Path(sys.executable).parent / "lmops"
    proc = subprocess.Popen([str(lmops), "ui", "--mlflow-port", str(mport), "--prefect-port", str(pport)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    seen: list[str] = []
    _collect(proc, seen)
    try:
        m1 = _read_until(proc, r"MLflow UI:\s+(\S+)\s+\(pid (\d+)", 120, seen)
        m2 = _read_until(proc, r"Prefect UI:\s+(\S+)\s+\(pid (\d+)", 180, seen)
        _read_until(proc, r"press Ctrl-C", 10, seen)
        for url in (m1.group(1), m2.group(1)):
            with urllib.request.urlopen(url + "/", timeout=30) as resp:
                assert resp.status == 200 and len(resp.read()) > 100
        pids = [int(m1.group(2)), int(m2.group(2))]
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == 0, "".join(seen)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for pid in pids:  # the group leaders and every process in their groups are gone
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)


def test_ui_refuses_a_busy_port(tmp_path):
    import socket

    from lmcore.errors import LmopsError
    from lmcore.ui import start_mlflow_ui

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        os.environ["LMOPS_HOME"] = str(tmp_path / "home")
        with pytest.raises(LmopsError, match=f"port {port} on 127.0.0.1 is already in use"):
            start_mlflow_ui(port)
