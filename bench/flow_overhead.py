"""What Prefect orchestration costs: the training flow vs the same lmcore calls made directly.

Each side runs in a fresh process on its own workspace and lmops home with the same tiny data
(the first 100 kB of tinyshakespeare) and params: ingest -> prepare -> train -> evaluate ->
log/register -> gate. Both homes are set up first (MLflow's and Prefect's databases created, as
after any earlier run), so the figure is the steady-state cost of orchestration; the one-off
cost of creating Prefect's database in a brand-new home is reported as `first_run_extra_s`.
Then the flow runs once more on unchanged data: the fully cached re-run.

    python bench/flow_overhead.py [--json] [--steps 60]

Prints overhead_s (flow - direct), overhead_ratio (flow / direct) and cached_rerun_s.
Target: overhead <= max(15 s, 0.2 x direct); cached re-run <= 20 s (ephemeral Prefect API).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import cpu_header, with_cpu

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"

PARAMS = """\
data: {{sources: [corpus], min_chars: 8, max_failure_rate: 0.9}}
prepare: {{val_fraction: 0.1, seed: 7}}
tokenizer: {{kind: byte, vocab_size: 257}}
model: {{n_layer: 2, n_head: 4, n_kv_head: 4, d_model: 64, block_size: 64}}
train: {{device: cpu, batch_size: 8, max_steps: {steps}, max_minutes: 0, eval_interval: 0, checkpoint_interval: 0,
        warmup_steps: 5}}
eval: {{batch_size: 8, max_batches: 8, n_samples: 1, sample_max_new_tokens: 16, prompts: ["ROMEO:"]}}
registry: {{model_name: bench-lm, experiment: bench}}
"""

DIRECT = """
import sys
from pathlib import Path
from lmcore.config import load_params
from lmcore.data.ingest import ingest
from lmcore.data.versions import DataRegistry
from lmcore.training.evaluate import evaluate
from lmcore.data.prepare import prepare_dataset, prepare_key
from lmcore.registry.models import gate, log_model, register_version
from lmcore.registry.reports import log_training_outputs
from lmcore.settings import get_settings
from lmcore.registry.tracking import RunTracker, configure_mlflow
from lmcore.training.loop import train

p = load_params()
configure_mlflow()
reg = DataRegistry.open()
ingest(["corpus"], p.data, registry=reg, progress=False)
version = reg.current().id
data = get_settings().runs_dir / "prepared" / prepare_key(version, p)
prepare_dataset(reg.iter_records(version), data, p.tokenizer, p.prepare, dataset_version=version)
out = get_settings().runs_dir / "train" / "direct"
tracker = RunTracker.start(p.registry.experiment, "direct", p.flat(), {})
res = train(data, out, p.model, p.train, progress=False, on_metrics=tracker.log_metrics, dataset_version=version)
metrics = evaluate(res.model_dir, data, p.eval, out_path=out / "eval.json")
log_training_outputs(tracker, model_dir=res.model_dir, metrics=metrics, history_csv=res.history_csv, params=p)
uri = log_model(tracker, res.model_dir)
tracker.finish()
v = register_version(uri, p.registry.model_name, {}, tracker.run_id)
gate(p.registry.model_name, v, data, p)
"""


WARM = """
from lmcore.registry.tracking import configure_mlflow
configure_mlflow()
if "prefect" in __import__("sys").argv:
    from prefect import flow
    flow(lambda: None, name="warm-up")()
"""


def workspace(root: Path, steps: int) -> Path:
    root.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    (root / "params.yaml").write_text(PARAMS.format(steps=steps))
    (root / "corpus").mkdir()
    (root / "corpus" / "shakespeare.txt").write_text(CORPUS.read_text()[:100_000])
    return root


def timed(cmd: list[str], ws: Path) -> float:
    env = {**os.environ, "LMOPS_WORKSPACE": str(ws), "LMOPS_HOME": str(ws / ".lmops")}
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PREFECT_HOME", None)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--steps", type=int, default=60, help="training steps on each side")
    args = ap.parse_args()
    if not CORPUS.is_file():
        sys.exit(f"benchmark corpus not found: {CORPUS}")
    cpu_header()
    with tempfile.TemporaryDirectory(prefix="lmops-flow-bench-") as tmp:
        direct_ws = workspace(Path(tmp) / "direct", args.steps)
        flow_ws = workspace(Path(tmp) / "flow", args.steps)
        timed([sys.executable, "-c", WARM], direct_ws)
        first_prefect_s = timed([sys.executable, "-c", WARM, "prefect"], flow_ws)
        warm_prefect_s = timed([sys.executable, "-c", WARM, "prefect"], flow_ws)
        direct_s = timed([sys.executable, "-c", DIRECT], direct_ws)
        flow_s = timed([sys.executable, "-m", "flows.cli", "run", "--json"], flow_ws)
        cached_s = timed([sys.executable, "-m", "flows.cli", "run", "--json"], flow_ws)
    overhead = flow_s - direct_s
    result = {
        "direct_s": round(direct_s, 2),
        "flow_s": round(flow_s, 2),
        "overhead_s": round(overhead, 2),
        "overhead_ratio": round(flow_s / direct_s, 3),
        "cached_rerun_s": round(cached_s, 2),
        "first_run_extra_s": round(first_prefect_s - warm_prefect_s, 2),
        "target_overhead_s": round(max(15.0, 0.2 * direct_s), 2),
        "steps": args.steps,
    }
    if not args.json:
        print(f"direct lmcore calls   {direct_s:7.1f} s")
        print(f"training flow         {flow_s:7.1f} s   overhead {overhead:+.1f} s ({flow_s / direct_s:.2f}x)")
        print(f"cached re-run (flow)  {cached_s:7.1f} s")
    print(json.dumps(with_cpu(result)))


if __name__ == "__main__":
    main()
