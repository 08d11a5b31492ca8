"""Overhead MLflow tracking adds to a short training run: logging every step vs no logging.

Same tiny model, data and steps; runs interleaved (ABAB.., order flipped each round) and
medians compared. The tracked run logs train loss, lr and tokens/s at every step through
``RunTracker.log_metrics`` (buffered, written by ``log_batch`` on a background thread) into
the embedded sqlite store, and the time includes ``finish()`` (the final flush). Run setup
(creating the run, logging ~100 params) is reported separately. Target: overhead_ratio <= 1.05.

    python bench/tracking.py [--json] [--steps 200] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import cpu_header, with_cpu

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared/data/tinyshakespeare.txt"
# params.yaml's configuration with only these keys changed: a tiny model, CPU, a fixed number of steps,
# no evaluation or checkpoint inside the timed span, and a metrics row (an MLflow log call) every step.
OVERRIDES = {
    "model.n_layer": 2, "model.n_head": 2, "model.n_kv_head": 2, "model.d_model": 64, "model.block_size": 64,
    "train.device": "cpu", "train.batch_size": 8, "train.max_minutes": 0, "train.warmup_steps": 10,
    "train.eval_interval": 10**9, "train.eval_iters": 1, "train.checkpoint_interval": 10**9, "train.log_interval": 1,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    work = Path(tempfile.mkdtemp(prefix="lmops-bench-tracking-"))
    os.environ["LMOPS_HOME"] = str(work / "home")
    os.environ.pop("MLFLOW_TRACKING_URI", None)

    import torch

    from lmcore.config import TokenizerParams, load_params
    from lmcore.data.prepare import prepare_split_texts
    from lmcore.registry.tracking import RunTracker, configure_mlflow
    from lmcore.settings import apply_environment
    from lmcore.training.loop import train

    apply_environment()
    torch.set_num_threads(args.threads)
    cpu_header()
    text = CORPUS.read_text(encoding="utf-8")[:200_000]
    cut = int(len(text) * 0.9)
    data = prepare_split_texts([text[:cut]], [text[cut:]], work / "data", TokenizerParams(kind="byte")).dir
    params = load_params(ROOT / "params.yaml", {**OVERRIDES, "train.max_steps": args.steps})
    model, tp = params.model, params.train
    flat = params.flat()
    configure_mlflow()
    RunTracker.start("bench", "warmup", {}, {}, system_metrics=False).finish()  # DB migrations, imports

    setup_times: list[float] = []
    calls: list[int] = []

    def untracked() -> None:
        train(data, work / "run-plain", model, tp, progress=False)

    def tracked() -> None:
        t0 = time.perf_counter()
        tracker = RunTracker.start("bench", "tracked", flat, {"lmops.kind": "bench"}, system_metrics=False)
        setup_times.append(time.perf_counter() - t0)
        n = [0]

        def hook(step: int, metrics: dict) -> None:
            n[0] += 1
            tracker.log_metrics(step, metrics)

        t1 = time.perf_counter()
        train(data, work / "run-tracked", model, tp, progress=False, on_metrics=hook)
        tracker.finish()
        times["tracked"].append(time.perf_counter() - t1)
        calls.append(n[0])

    times: dict[str, list[float]] = {"plain": [], "tracked": []}
    untracked()  # warm up torch
    for r in range(args.repeats):
        order = ("plain", "tracked") if r % 2 == 0 else ("tracked", "plain")
        for name in order:
            if name == "plain":
                t0 = time.perf_counter()
                untracked()
                times["plain"].append(time.perf_counter() - t0)
            else:
                tracked()
    plain, trk = statistics.median(times["plain"]), statistics.median(times["tracked"])
    result = {
        "benchmark": "tracking",
        "steps": args.steps,
        "metric_logs_per_run": calls[-1] if calls else 0,
        "untracked_s": round(plain, 3),
        "tracked_s": round(trk, 3),
        "overhead_ratio": round(trk / plain, 4),
        "run_setup_s": round(statistics.median(setup_times), 3),
        "repeats": args.repeats,
        "target": 1.05,
    }
    print(f"train {args.steps} steps: untracked {plain:.3f} s  tracked (every step) {trk:.3f} s  "
          f"overhead ratio {trk / plain:.3f} (target <= 1.05); run setup {result['run_setup_s']} s")
    if args.json:
        print(json.dumps(with_cpu(result)))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
