"""Ingest + validate (GX) + version (DVC) N short JSONL records vs a plain ``pandas.read_json``.

Generates N records (default 1,000,000) in a temp dir, then, interleaved per repeat:
  - reference: ``pandas.read_json(path, lines=True)`` in this process;
  - lmops: ``lmcore.data.ingest.ingest([path])`` into a fresh workspace + lmops home, run in a
    child process so its peak RSS (``ru_maxrss``) is its own. GX/DVC/pandas are imported in the
    child before the clock starts (a long-lived flow worker pays imports once); the child's total
    wall time including imports is reported as ``cold_s``.
Reports records/s of both, ``cost_ratio`` = lmops time / read_json time (target <= 3) and
``peak_rss_mb`` (target < 2048).

    python bench/ingest.py [--json] [--records 1000000] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import cpu_header, with_cpu

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, resource, sys, time
t_start = time.perf_counter()
from pathlib import Path
sys.path.insert(0, sys.argv[4])
from lmcore.config import load_params
from lmcore.data.ingest import ingest
from lmcore.data.versions import DataRegistry, _quiet_dvc
from lmcore.data.validate import import_gx
import_gx(); _quiet_dvc()
ws, home, path = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
params = load_params(ws / "params.yaml").data
t0 = time.perf_counter()
r = ingest([path], params, registry=DataRegistry(ws, home), progress=False)
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "cold_s": time.perf_counter() - t_start, "rows": r.rows, "accepted": r.accepted,
                  "quarantined": r.quarantined, "version": r.version,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "timings": r.timings}))
"""


def make_records(path: Path, n: int) -> None:
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"record {i}: {words[i % 8]} {words[(i * 7) % 8]} jumps over {i * 31 % 9973}"}))
            f.write("\n")


def run_lmops(tmp: Path, path: Path, k: int) -> dict:
    ws, home = tmp / f"ws{k}", tmp / f"home{k}"
    ws.mkdir()
    shutil.copy(ROOT / "params.yaml", ws / "params.yaml")
    shutil.copytree(ROOT / "expectations", ws / "expectations")
    env = dict(os.environ, LMOPS_HOME=str(home), LMOPS_WORKSPACE=str(ws), GX_ANALYTICS_ENABLED="false",
               DVC_NO_ANALYTICS="1")
    out = subprocess.run([sys.executable, "-c", CHILD, str(ws), str(home), str(path), str(ROOT)], env=env,
                         capture_output=True, text=True, cwd=ws)
    if out.returncode != 0:
        raise SystemExit(f"lmops ingest failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()
    cpu_header()
    import pandas as pd

    tmp = Path(tempfile.mkdtemp(prefix="lmops-bench-ingest-"))
    try:
        path = tmp / "records.jsonl"
        make_records(path, args.records)
        size_mb = path.stat().st_size / 2**20
        ref_t, runs = [], []
        for k in range(args.repeats):
            t0 = time.perf_counter()
            df = pd.read_json(path, lines=True)
            ref_t.append(time.perf_counter() - t0)
            assert len(df) == args.records
            del df
            runs.append(run_lmops(tmp, path, k))
        lm = statistics.median(r["seconds"] for r in runs)
        ref = statistics.median(ref_t)
        res = {
            "benchmark": "ingest", "records": args.records, "file_mb": round(size_mb, 1),
            "lmops_s": round(lm, 3), "lmops_records_per_s": round(args.records / lm),
            "cold_s": round(statistics.median(r["cold_s"] for r in runs), 3),
            "read_json_s": round(ref, 3), "read_json_records_per_s": round(args.records / ref),
            "cost_ratio": round(lm / ref, 3), "peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs), 1),
            "accepted": runs[-1]["accepted"], "quarantined": runs[-1]["quarantined"],
            "targets": {"cost_ratio": 3.0, "peak_rss_mb": 2048}, "lmops_timings": runs[-1]["timings"],
        }
        print(f"lmops ingest+validate+version: {res['lmops_s']}s ({res['lmops_records_per_s']:,} rec/s), "
              f"cold {res['cold_s']}s; pandas.read_json: {res['read_json_s']}s "
              f"({res['read_json_records_per_s']:,} rec/s); cost_ratio {res['cost_ratio']}; "
              f"peak RSS {res['peak_rss_mb']} MB")
        if args.json:
            print(json.dumps(with_cpu(res)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
