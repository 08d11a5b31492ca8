"""`lmops ui` starts the MLflow and Prefect UIs, serves both pages, and stops both children on a signal.

Starting Prefect is orchestration: it lives in flows/ (``flows.ui``), lmcore only has the process
handling and the MLflow UI. A first start creates Prefect's database as its own step, as `lmops run` does.
"""

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
    from lmcore.services import free_port

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
        # a fresh home: the database was made first, as its own announced step, before the server started
        said = "".join(seen)
        assert said.count("preparing Prefect's local database") == 1, said
        assert said.index("preparing Prefect's local database") < said.index("Prefect UI:")
        assert (tmp_path / "home" / "prefect" / "prefect.db").is_file()
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
    from lmcore.services import start_mlflow_ui

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        os.environ["LMOPS_HOME"] = str(tmp_path / "home")
        with pytest.raises(LmopsError, match=f"port {port} on 127.0.0.1 is already in use"):
            start_mlflow_ui(port)


def test_lmcore_starts_no_prefect():
    """lmcore.services and the lmcore CLI import neither flows nor Prefect; `lmops ui` is a flows verb."""
    code = ("import sys, lmcore.services, lmcore.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('flows', 'prefect')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    import lmcore.services

    assert not hasattr(lmcore.services, "start_prefect_server") and not hasattr(lmcore.services, "run_uis")
    from flows.cli import app

    assert "ui" in {c.name or c.callback.__name__ for c in app.registered_commands}


def test_the_database_is_prepared_only_for_the_servers_own_home(tmp_path, monkeypatch):
    """In-process Prefect settings are fixed at import: a server with another home migrates its own database."""
    from flows.ui import prepare_server_database
    from lmcore.settings import Settings

    monkeypatch.delenv("PREFECT_HOME", raising=False)  # Settings.prefect_home: the lmops home's own
    other = Settings(workspace=tmp_path, home=tmp_path / "other")
    said: list[str] = []
    assert prepare_server_database(other, echo=said.append) is None and said == []
    assert not (tmp_path / "other").exists()


def test_ui_beyond_loopback_is_refused_unless_opened_on_purpose(tmp_path):
    """Issue 25, finding 3: neither UI authenticates, so `lmops ui --host 0.0.0.0` refuses in one line
    (before starting anything) unless --open-to-network says it sits behind an authenticating proxy."""
    lmops = Path(sys.executable).with_name("lmops")
    env = {**os.environ, "LMOPS_HOME": str(tmp_path / "home")}
    r = subprocess.run([str(lmops), "ui", "--host", "0.0.0.0", "--no-prefect"], env=env, capture_output=True,
                       text=True, timeout=120)
    err = r.stderr.strip()
    assert r.returncode == 1 and len(err.splitlines()) == 1 and "no authentication" in err and "champion" in err
    assert not (tmp_path / "home" / "logs").exists()  # refused before any server started
