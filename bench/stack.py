"""The team stack's servers under concurrent load: PostgreSQL vs SQLite behind the same Prefect and MLflow servers.

For each backend a fresh Prefect server and MLflow server start on it (PostgreSQL: `lmcore.postgres`,
as `lmops stack up` runs it; SQLite: each server's own file, as `lmops ui` runs it). Then, at once:

- K processes each run R small flows (three tasks, results persisted) against the Prefect API:
  runs per minute over the time the flows ran, and the runs that failed;
- K threads each make N API calls (create a flow run, set its state, list runs; log a metric to an
  MLflow run): p50/p95 latency per call, and the calls that failed (e.g. "database is locked").

    python bench/stack.py [--k 8] [--runs 3] [--calls 20] [--backends postgresql,sqlite] [--json]

Target: no errors on PostgreSQL at K = 8.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import ROOT, cpu_header, with_cpu

sys.path.insert(0, str(ROOT))

from lmcore.postgres import Cluster  # noqa: E402
from lmcore.services import free_port, start_mlflow_server, stop_service  # noqa: E402

FLOWS = """
import json, sys, time
from prefect import flow, task

@task(persist_result=True)
def double(x: int) -> int:
    return 2 * x

@flow(name="bench-stack", persist_result=True)
def bench(i: int) -> int:
    return sum(double.map(range(3)).result()) + i

ok, failed, errors, t0 = 0, 0, [], time.time()
for i in range(int(sys.argv[1])):
    try:
        bench(i)
        ok += 1
    except Exception as e:
        failed += 1
        errors.append(f"{type(e).__name__}: {str(e).splitlines()[0][:160]}" if str(e) else type(e).__name__)
print(json.dumps({"ok": ok, "failed": failed, "errors": errors, "start": t0, "end": time.time()}))
"""


def start_backend(backend: str, base: Path) -> tuple[list, Cluster | None, str, str]:
    """Prefect + MLflow servers on ``backend``; returns (services, cluster, prefect API URL, MLflow URL)."""
    sys.path.insert(0, str(ROOT))
    from flows.ui import start_prefect_server
    from lmcore.settings import Settings

    settings = Settings(workspace=ROOT, home=base / "home")
    cluster = None
    if backend == "postgresql":
        cluster = Cluster(base / "stack" / "postgres", free_port())
        cluster.init()
        cluster.start()
        cluster.ensure_databases(["bench_prefect", "bench_mlflow"])
        prefect_db = cluster.url("bench_prefect", "asyncpg")
        mlflow_db = cluster.url("bench_mlflow")
    else:
        prefect_db = f"sqlite+aiosqlite:///{base / 'prefect.db'}"
        mlflow_db = f"sqlite:///{base / 'mlflow.db'}"
    os.environ["PREFECT_HOME"] = str(settings.prefect_home)
    pf = start_prefect_server(free_port(), settings=settings, timeout=300, database_url=prefect_db)
    ml = start_mlflow_server(free_port(), "127.0.0.1", mlflow_db,
                             ["--serve-artifacts", "--artifacts-destination", str(base / "art")],
                             base / "mlflow.log", 180)
    return [pf, ml], cluster, f"{pf.url}/api", ml.url


def run_flows(k: int, runs: int, env: dict[str, str]) -> dict:
    procs = [subprocess.Popen([sys.executable, "-c", FLOWS, str(runs)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True) for _ in range(k)]
    results, errors = [], []
    for p in procs:
        out, _ = p.communicate(timeout=1200)
        try:
            results.append(json.loads(out.strip().splitlines()[-1]))
        except (ValueError, IndexError):
            errors.append(f"runner exited {p.returncode} without a result")
    ok = sum(r["ok"] for r in results)
    failed = sum(r["failed"] for r in results) + len(errors) * runs
    span = max(r["end"] for r in results) - min(r["start"] for r in results) if results else float("nan")
    return {"flow_runs_ok": ok, "flow_runs_failed": failed, "flow_seconds": round(span, 1),
            "runs_per_min": round(60 * ok / span, 1) if results else 0.0,
            "flow_errors": sorted(set(errors + [e for r in results for e in r["errors"]]))[:5]}


def api_calls(k: int, calls: int, api: str, mlflow_url: str) -> dict:
    """K threads x ``calls`` rounds of Prefect and MLflow API calls; latency per call, errors."""
    import prefect.settings
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Running

    lat: dict[str, list[float]] = {"prefect": [], "mlflow": []}
    errors: list[str] = []
    lock = threading.Lock()
    ml = MlflowClient(mlflow_url)
    exp = ml.create_experiment(f"bench-{time.time_ns()}")

    def timed(kind: str, fn) -> None:
        t = time.perf_counter()
        try:
            fn()
        except Exception as e:  # the errors are what this benchmark counts
            with lock:
                errors.append(f"{kind}: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
            return
        with lock:
            lat[kind].append(time.perf_counter() - t)

    def worker() -> None:
        with prefect.settings.temporary_settings(updates={prefect.settings.PREFECT_API_URL: api}), \
                get_client(sync_client=True) as client:
            run_id = ml.create_run(exp).info.run_id
            bench_flow = _bench_flow()
            for i in range(calls):
                def prefect_round(i: int = i) -> None:
                    run = client.create_flow_run(bench_flow, parameters={"i": i})
                    client.set_flow_run_state(run.id, Running())
                    client.set_flow_run_state(run.id, Completed())
                    client.read_flow_runs(limit=10)
                timed("prefect", prefect_round)
                timed("mlflow", lambda i=i: ml.log_metric(run_id, "x", float(i), step=i))

    threads = [threading.Thread(target=worker) for _ in range(k)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = {"api_seconds": round(time.perf_counter() - t0, 1), "api_errors": len(errors),
           "api_error_kinds": sorted(set(errors))[:5]}
    for kind, xs in lat.items():
        xs.sort()
        out[f"{kind}_p50_ms"] = round(1000 * statistics.median(xs), 1) if xs else None
        out[f"{kind}_p95_ms"] = round(1000 * xs[int(0.95 * (len(xs) - 1))], 1) if xs else None
    return out


def _bench_flow():
    from prefect import flow

    @flow(name="bench-stack-api")
    def bench_api(i: int) -> int:
        return i

    return bench_api


def measure(backend: str, k: int, runs: int, calls: int) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"lmops-bench-{backend}-", dir="/tmp") as tmp:
        base = Path(tmp)
        base.chmod(0o711)
        services, cluster, api, mlflow_url = start_backend(backend, base)
        try:
            env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
                   "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(base / "results"),
                   "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "CRITICAL"}
            flows = run_flows(k, runs, env)
            api_stats = api_calls(k, calls, api, mlflow_url)
        finally:
            for svc in reversed(services):
                stop_service(svc)
            if cluster is not None:
                cluster.stop()
    return {"backend": backend, "k": k, **flows, **api_stats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=8, help="concurrent flow-run processes and API threads")
    ap.add_argument("--runs", type=int, default=3, help="flow runs per process")
    ap.add_argument("--calls", type=int, default=20, help="API rounds per thread")
    ap.add_argument("--backends", default="postgresql,sqlite")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    cpu_header()
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
    results = []
    for backend in args.backends.split(","):
        r = measure(backend, args.k, args.runs, args.calls)
        results.append(r)
        print(f"{backend:<10} K={r['k']}: {r['runs_per_min']} flow runs/min ({r['flow_runs_ok']} ok, "
              f"{r['flow_runs_failed']} failed); Prefect API p95 {r['prefect_p95_ms']} ms, MLflow p95 "
              f"{r['mlflow_p95_ms']} ms; {r['api_errors']} API errors {r['api_error_kinds'] or ''}"
              f"{' flow errors ' + str(r['flow_errors']) if r['flow_errors'] else ''}", flush=True)
    if args.json:
        print(json.dumps(with_cpu({"benchmark": "stack", "results": results})))


if __name__ == "__main__":
    main()
