"""Prefect's ephemeral API on a first run (issue 13): its database made first, a start timeout in one line.

Each test that starts Prefect does so in a subprocess with a fresh PREFECT_HOME, as a first run of
a fresh clone does; in this process Prefect's settings are fixed when it is first imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.code]


def _env(prefect_home: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PREFECT_HOME": str(prefect_home), **extra}
    env.pop("PREFECT_API_URL", None)
    return env


@pytest.mark.slow
def test_a_start_timeout_is_one_error_line(tiny_workspace, tmp_path):
    """A server that misses Prefect's start-up limit: one `error:` line saying what to do, exit 1, no traceback.

    A 1 s limit is far below any ephemeral server's start (its imports alone take seconds), so this
    always takes the failure path; before issue 13 it printed Prefect's RuntimeError traceback.
    """
    home = tmp_path / "prefect"
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--source", str(tiny_workspace / "corpus")],
        cwd=tiny_workspace, env=_env(home, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="1"),
        capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert "did not start within 1 s" in errors[0]
    assert "run the command again" in errors[0]
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in errors[0] and "PREFECT_API_URL" in errors[0]
    # the database was still created, as its own announced step, before the server was tried
    assert proc.stderr.count("preparing Prefect's local database") == 1, proc.stderr
    assert (home / "prefect.db").is_file()


PREPARE_THEN_FLOW = """
import json, sqlite3, sys, time

from lmcore.settings import apply_environment

apply_environment()
from prefect import flow

from flows.prefect_home import _applied_revisions, _head_revisions, ephemeral_database_path, prepare_prefect_database

said = []
first = prepare_prefect_database(echo=said.append)
t0 = time.monotonic()
second = prepare_prefect_database(echo=said.append)
second_s = time.monotonic() - t0
path = ephemeral_database_path()


@flow(name="after-prepare")
def after_prepare() -> int:
    return 42


t0 = time.monotonic()
value = after_prepare()
flow_s = time.monotonic() - t0
with sqlite3.connect(path) as conn:
    runs = conn.execute("SELECT state_type FROM flow_run").fetchall()
print(json.dumps({
    "first": first, "second": second, "second_s": second_s, "said": said, "path": str(path),
    "applied": sorted(_applied_revisions(path)), "heads": sorted(_head_revisions()),
    "value": value, "flow_s": flow_s, "runs": [r[0] for r in runs],
}))
"""


@pytest.mark.slow
def test_database_is_prepared_once_then_a_flow_runs_on_it(tmp_path):
    """A fresh PREFECT_HOME: one announced migration to Prefect's head, a second call a fast no-op,
    then a flow whose ephemeral server finds the database ready (within 60 s, a third of the default limit)."""
    home = tmp_path / "prefect"
    proc = subprocess.run(
        [sys.executable, "-c", PREPARE_THEN_FLOW],
        cwd=tmp_path, env=_env(home, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="60"),
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(out["path"]) == home / "prefect.db"
    assert isinstance(out["first"], float) and out["first"] > 0
    assert out["said"] == ["preparing Prefect's local database (first run only, ~10-45 s) ..."]
    assert out["applied"] == out["heads"] and out["heads"]
    assert out["second"] is None and out["second_s"] < 5.0, out
    assert out["value"] == 42
    assert out["runs"] == ["COMPLETED"]


def test_nothing_to_prepare_when_an_api_url_is_set(tmp_path):
    """With PREFECT_API_URL the server owns its database: nothing is announced and no file is made."""
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL, PREFECT_API_URL, PREFECT_HOME, temporary_settings

    from flows.prefect_home import ephemeral_database_path, prepare_prefect_database

    said: list[str] = []
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api", PREFECT_HOME: tmp_path / "p"}):
        assert ephemeral_database_path() is None
        assert prepare_prefect_database(echo=said.append) is None
    assert said == [] and not (tmp_path / "p").exists()
    # the session's test harness may have set an API URL and a database: back to Prefect's defaults
    with temporary_settings(updates={PREFECT_HOME: tmp_path / "p"},
                            restore_defaults={PREFECT_API_URL, PREFECT_API_DATABASE_CONNECTION_URL}):
        assert ephemeral_database_path() == tmp_path / "p" / "prefect.db"


def test_other_runtime_errors_pass_through():
    """Only Prefect's start-up timeout becomes an `error:` line; any other RuntimeError keeps its traceback."""
    from flows.prefect_home import EPHEMERAL_TIMEOUT_MESSAGE, prefect_start_errors
    from lmcore.errors import LmopsError

    with pytest.raises(RuntimeError, match="something else"), prefect_start_errors():
        raise RuntimeError("something else")
    with pytest.raises(LmopsError, match="did not start within"), prefect_start_errors():
        raise RuntimeError(EPHEMERAL_TIMEOUT_MESSAGE + ". stdout: None")
