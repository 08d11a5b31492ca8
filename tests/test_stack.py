"""The team stack, for real: `lmops stack up` (PostgreSQL, Prefect server, MLflow server with its artifact
proxy, two process workers), driven through the Prefect API and the CLI, then `lmops stack down`.

One stack for the whole module (it takes ~40 s to start on 2 cores); the tests run in file order and
share it: concurrent training runs, a second machine, `lmops doctor`, a killed worker (its run is
marked Crashed by the heartbeat automation while the later tests run), shared feedback, torchrun.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from _serve_helpers import free_port, wait_ready
from conftest import TINY_PARAMS, make_tiny_workspace

pytestmark = [pytest.mark.model, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
LMOPS = str(Path(sys.executable).with_name("lmops"))
MODEL = "tiny-lm"
STACK_PARAMS = TINY_PARAMS + (
    "stack:\n  workers: 2\n  heartbeat_s: 30\n  crash_after_s: 40\n  nproc_per_node: 2\n"
    "serve:\n  compile_decode: false\n"  # two servers compiling their decode step would slow every other test
)
RUN_TIMEOUT_S = 420


def _free_pair() -> int:
    """A port p with p + 1 free too (the two workers' health ports)."""
    for _ in range(50):
        p = free_port()
        if p < 65000:
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p + 1))
                return p
            except OSError:
                continue
    raise RuntimeError("no two consecutive free ports")


def _parse_exports(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export "):].partition("=")
            out[key] = value.strip("'")
    return out


class Stack:
    """The running stack: its printed environment, the test's own environment, helpers over the API."""

    def __init__(self, base: Path, ws: Path, exports: dict[str, str]) -> None:
        self.base, self.ws, self.exports = base, ws, exports
        self.env = {**os.environ, **exports, "LMOPS_WORKSPACE": str(ws), "LMOPS_HOME": str(base / "home"),
                    "PREFECT_HOME": str(base / "home" / "prefect")}
        self.killed_run: str | None = None
        self.ddp_run: str | None = None

    def lmops(self, *args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([LMOPS, *args], cwd=self.ws, env=env or self.env, capture_output=True, text=True,
                              timeout=timeout)

    @contextlib.contextmanager
    def client(self):
        """A sync Prefect client on the stack's API."""
        import prefect.settings
        from prefect.client.orchestration import get_client

        with prefect.settings.temporary_settings(updates={prefect.settings.PREFECT_API_URL:
                                                          self.exports["PREFECT_API_URL"]}), \
                get_client(sync_client=True) as client:
            yield client

    def submit(self, deployment: str, parameters: dict, n: int = 1) -> list[str]:
        import prefect.settings
        from prefect.deployments import run_deployment

        with prefect.settings.temporary_settings(updates={prefect.settings.PREFECT_API_URL:
                                                          self.exports["PREFECT_API_URL"]}):
            return [str(run_deployment(deployment, parameters=parameters, timeout=0).id) for _ in range(n)]

    def report(self, run_ids: list[str]) -> str:
        """Each run's state and message, and the last log lines of those that did not complete."""
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

        lines = []
        with self.client() as client:
            for r in run_ids:
                run = client.read_flow_run(r)
                lines.append(f"{r}: {run.state.name}: {run.state.message}")
                if run.state.name != "Completed":
                    logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[r])))
                    lines += [f"    {log.message[:400]}" for log in logs[-12:]]
        return "\n".join(lines)

    def completed(self, run_ids: list[str], timeout: float = RUN_TIMEOUT_S) -> None:
        runs = self.wait(run_ids, timeout)
        assert all(r.state.name == "Completed" for r in runs.values()), self.report(run_ids)

    def wait(self, run_ids: list[str], timeout: float = RUN_TIMEOUT_S, final: bool = True) -> dict[str, object]:
        """Poll until every run is final (or, with ``final=False``, Running); returns the runs."""
        deadline = time.monotonic() + timeout
        with self.client() as client:
            while True:
                runs = {r: client.read_flow_run(r) for r in run_ids}
                done = [r for r in runs.values() if r.state and (r.state.is_final() if final else
                                                                  r.state.is_running())]
                if len(done) == len(runs):
                    return runs
                if time.monotonic() > deadline:
                    raise AssertionError({r: run.state.name for r, run in runs.items()})
                time.sleep(1.0)


@pytest.fixture(scope="module")
def stack():
    base = Path(tempfile.mkdtemp(prefix="lmops-stack-", dir="/tmp"))
    base.chmod(0o711)  # PostgreSQL runs as the postgres user and must reach its data folder
    ws = make_tiny_workspace(base / "ws", STACK_PARAMS)
    (ws / "flows").symlink_to(ROOT / "flows")  # prefect.yaml's entry points, relative to the workspace
    env = {**os.environ, "LMOPS_WORKSPACE": str(ws), "LMOPS_HOME": str(base / "home"),
           "PREFECT_HOME": str(base / "home" / "prefect")}
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "LMOPS_FEEDBACK_DB"):
        env.pop(key, None)
    pg, pf, ml, wk = free_port(), free_port(), free_port(), _free_pair()
    up = subprocess.run([LMOPS, "stack", "up", "--no-schedules", "--postgres-port", str(pg), "--prefect-port",
                         str(pf), "--mlflow-port", str(ml), "--worker-port", str(wk)],
                        cwd=ws, env=env, capture_output=True, text=True, timeout=600)
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        exports = _parse_exports(up.stdout)
        yield Stack(base, ws, exports)
    finally:
        down = subprocess.run([LMOPS, "stack", "down"], cwd=ws, env=env, capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stderr
        status = subprocess.run([LMOPS, "stack", "status"], cwd=ws, env=env, capture_output=True, text=True)
        assert "no stack is up" in status.stdout
        shutil.rmtree(base, ignore_errors=True)


def test_stack_up_prints_the_team_environment_and_every_part_is_healthy(stack):
    assert set(stack.exports) >= {"PREFECT_API_URL", "MLFLOW_TRACKING_URI", "LMOPS_FEEDBACK_DB", "LMOPS_OPTUNA_DB",
                                  "PREFECT_RESULTS_LOCAL_STORAGE_PATH", "LMOPS_RDZV_ENDPOINT"}
    assert stack.exports["LMOPS_FEEDBACK_DB"].startswith("postgresql+psycopg://")
    status = stack.lmops("stack", "status")
    assert status.returncode == 0, status.stdout + status.stderr
    lines = status.stdout.strip().splitlines()
    assert [ln.split()[0] for ln in lines] == ["postgres", "prefect", "mlflow", "lmops-worker-1", "lmops-worker-2"]
    assert all(ln.endswith("healthy") for ln in lines)


def test_four_concurrent_training_runs_on_two_workers(stack):
    """Two distinct models, each asked for twice at once: all complete, each registered once, one champion."""
    from mlflow import MlflowClient

    ids = stack.submit("training/nightly", {"overrides": {"train.seed": 1}}, 2)
    ids += stack.submit("training/nightly", {"overrides": {"train.seed": 2}}, 2)
    stack.completed(ids)
    with stack.client() as client:  # visible through the API, each on the pool
        listed = {str(r.id): r for r in client.read_flow_runs()}
    assert all(i in listed and listed[i].work_pool_name == "lmops" for i in ids)

    # registry_uri too: an earlier test in this process may have set MLflow's global registry URI
    ml = MlflowClient(stack.exports["MLFLOW_TRACKING_URI"], registry_uri=stack.exports["MLFLOW_TRACKING_URI"])
    versions = ml.search_model_versions(f"name='{MODEL}'")
    keys = [v.tags.get("lmops.train_key") for v in versions]
    assert len(keys) == 2 and len(set(keys)) == 2, keys  # no version registered twice
    registered = ml.get_registered_model(MODEL)
    champion = ml.get_model_version_by_alias(MODEL, "champion")  # exactly one: an alias names one version
    history = json.loads(registered.tags["lmops.alias_history"])
    assert [h["at"] for h in history] == sorted(h["at"] for h in history)  # in order
    assert str(history[-1]["version"]) == str(champion.version) and history[0]["previous"] is None
    assert all(h["previous"] == prev["version"] for prev, h in zip(history, history[1:], strict=False))
    run = ml.get_run(champion.run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # artifacts go through the server's proxy


def test_a_second_machine_needs_only_the_printed_environment(stack, tmp_path):
    """Another home, no workspace settings, no storage credentials: the champion through the artifact proxy."""
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "LMOPS_HOME": str(tmp_path / "other-home"),
           **stack.exports}
    r = stack.lmops("generate", "--model", f"models:/{MODEL}@champion", "--max-new-tokens", "8", "--no-stream",
                    "--seed", "0", "def ", env=env, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("def ") and len(r.stdout) > len("def ")
    assert any((tmp_path / "other-home").rglob("model.safetensors"))  # downloaded into the second home


def test_doctor_passes_on_the_stack_and_fails_on_a_bad_setup(stack, tmp_path):
    """The good setup (with the worker probes) and a bad one (MLflow on SQLite without the proxy, a SQLite
    feedback store) checked at once."""
    from lmcore.services import start_mlflow_server, stop_service

    good = subprocess.Popen([LMOPS, "doctor"], cwd=stack.ws, env=stack.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    bad_server = start_mlflow_server(free_port(), "127.0.0.1", f"sqlite:///{tmp_path / 'bad.db'}",
                                     ["--default-artifact-root", (tmp_path / "art").as_uri()], tmp_path / "bad.log")
    try:
        env = {**stack.env, "MLFLOW_TRACKING_URI": bad_server.url}
        env.pop("LMOPS_FEEDBACK_DB")
        bad = stack.lmops("doctor", "--no-workers", env=env)
    finally:
        stop_service(bad_server)
    out, err = good.communicate(timeout=400)
    assert good.returncode == 0, out + err
    assert "FAIL" not in out and "same git revision" in out and "result storage shared" in out
    assert bad.returncode == 1, bad.stdout + bad.stderr
    lines = bad.stdout.splitlines()
    sqlite = next(ln for ln in lines if "no SQLite" in ln)
    assert sqlite.startswith("FAIL") and "mlflow server" in sqlite and "feedback" in sqlite
    assert next(ln for ln in lines if "artifact proxy" in ln).startswith("FAIL")


def _worker_of(pid: int, workers: dict[int, str]) -> int:
    """The stack worker whose process tree holds ``pid``."""
    while pid > 1:
        if pid in workers:
            return pid
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    raise AssertionError("flow run is not under a stack worker")


def test_kill_a_worker_in_the_middle_of_a_run(stack):
    """SIGKILL the worker running a training run (its process group: the run dies with it)."""
    (run_id,) = stack.submit("training/nightly", {"overrides": {"train.seed": 3, "train.max_steps": 400}})
    run = stack.wait([run_id], timeout=240, final=False)[run_id]
    time.sleep(8)  # past the flow's start: ingest is under way
    state = json.loads((stack.base / "home" / "stack" / "state.json").read_text())
    workers = {s["pid"]: s["name"] for s in state["services"] if s["name"].startswith("lmops-worker")}
    with stack.client() as client:
        run = client.read_flow_run(run_id)
    assert run.state.is_running(), run.state.name
    pid = int(str(run.infrastructure_pid).rsplit(":", 1)[-1])
    worker, run_group = _worker_of(pid, workers), os.getpgid(pid)
    os.killpg(worker, signal.SIGKILL)  # the worker and, as on a machine that died, the run it started
    os.killpg(run_group, signal.SIGKILL)  # (Prefect starts a run in its own process group)
    stack.killed_run = run_id
    (stack.ddp_run,) = stack.submit("ddp-train/ddp-train", {"nproc_per_node": 2})  # on the surviving worker


def test_two_servers_share_one_feedback_store_and_one_harvest_takes_it_once(stack, tmp_path):
    procs, bases = [], []
    try:
        for i in range(2):
            port = free_port()
            procs.append(subprocess.Popen(
                [LMOPS, "serve", "--model", f"models:/{MODEL}@champion", "--port", str(port)], cwd=stack.ws,
                env={**stack.env, "LMOPS_HOME": str(tmp_path / f"serve{i}")}, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL))
            bases.append(f"http://127.0.0.1:{port}")
        for base, proc in zip(bases, procs, strict=True):
            wait_ready(base, timeout=180, proc=proc)
        sent = 0
        for i, base in enumerate(bases * 3):
            gid = httpx.post(base + "/v1/generate", json={"prompt": f"def f{i}(", "max_new_tokens": 6},
                             timeout=60).json()["generation_id"]
            r = httpx.post(base + "/v1/feedback", json={"generation_id": gid, "rating": 1}, timeout=30)
            assert r.status_code == 200, r.text
            sent += 1
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    harvests = [subprocess.Popen([LMOPS, "harvest", "--no-train", "--json"], cwd=stack.ws, env=stack.env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [h.communicate(timeout=300) for h in harvests]  # two harvests at once: one takes every row, once
    assert all(h.returncode == 0 for h in harvests), [err[-2000:] for _, err in outs]
    assert sorted(json.loads(out)["new_rows"] for out, _ in outs) == [0, sent]


def test_torchrun_training_as_a_deployment(stack):
    run_id = stack.ddp_run  # submitted after the kill: it ran beside the feedback test
    stack.completed([run_id])
    summary = json.loads((stack.base / "home" / "runs" / "ddp" / run_id / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 12


def test_the_killed_run_is_crashed_and_a_rerun_registers_nothing_twice(stack):
    from mlflow import MlflowClient

    assert stack.killed_run, "the kill test did not run"
    run = stack.wait([stack.killed_run], timeout=150)[stack.killed_run]
    assert run.state.name == "Crashed", (run.state.name, run.state.message)
    (rerun,) = stack.submit("training/nightly", {"overrides": {"train.seed": 3, "train.max_steps": 400}})
    stack.completed([rerun])
    keys = [v.tags.get("lmops.train_key") for v in
            MlflowClient(stack.exports["MLFLOW_TRACKING_URI"], registry_uri=stack.exports["MLFLOW_TRACKING_URI"])
            .search_model_versions(f"name='{MODEL}'")]
    assert len(keys) == len(set(keys)), keys  # nothing registered twice
