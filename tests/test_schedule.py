"""Schedules against a real Prefect server: deployments exist with their crons, and a run
triggered from one completes. `lmops schedule` is started and stopped by PID."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = [pytest.mark.model, pytest.mark.slow]


@pytest.fixture()
def prefect_server(tmp_path):
    from flows.ui import start_prefect_server
    from lmcore.services import free_port, stop_service
    from lmcore.settings import Settings

    home = tmp_path / "server-home"
    server = start_prefect_server(port=free_port(), settings=Settings(workspace=tmp_path, home=home), timeout=180)
    yield server
    stop_service(server)
    assert not server.alive()


def _read_deployments(api_url: str) -> dict:
    import httpx

    r = httpx.post(f"{api_url}/deployments/filter", json={}, timeout=10)
    r.raise_for_status()
    flows = {f["id"]: f["name"] for f in httpx.post(f"{api_url}/flows/filter", json={}, timeout=10).json()}
    return {f"{flows[d['flow_id']]}/{d['name']}": d for d in r.json()}


def test_schedule_serves_deployments_and_a_triggered_run_completes(prefect_server, tiny_workspace, tmp_path):
    api_url = f"{prefect_server.url}/api"
    env = {**os.environ, "PREFECT_API_URL": api_url, "PREFECT_HOME": str(tmp_path / "client-prefect")}
    log = (tmp_path / "schedule.log").open("w")  # closed in finally
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "schedule"], cwd=tiny_workspace, env=env,
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline, deployments = time.time() + 120, {}
        while time.time() < deadline and len(deployments) < 3:
            assert proc.poll() is None, (tmp_path / "schedule.log").read_text()
            deployments = _read_deployments(api_url)
            time.sleep(1)
        assert set(deployments) == {"training/nightly", "harvest/hourly", "monitor/monitoring"}
        crons = {k: [s["schedule"]["cron"] for s in d["schedules"]] for k, d in deployments.items()}
        assert crons == {"training/nightly": ["0 2 * * *"], "harvest/hourly": ["0 * * * *"],
                         "monitor/monitoring": ["30 * * * *"]}
        tz = deployments["training/nightly"]["schedules"][0]["schedule"]["timezone"]
        assert tz == "UTC"

        import prefect.settings
        from prefect.deployments import run_deployment

        with prefect.settings.temporary_settings(updates={prefect.settings.PREFECT_API_URL: api_url}):
            run = run_deployment(
                "training/nightly", parameters={"sources": [str(tiny_workspace / "corpus")]},
                timeout=300, poll_interval=2, as_subflow=False,
            )
        assert run.state.is_completed(), (run.state, (tmp_path / "schedule.log").read_text()[-3000:])
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        log.close()
    assert proc.returncode is not None
