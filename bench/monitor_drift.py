"""Calibration of the monitor's prompt-drift test: its false-alarm rate and its detection power.

False alarms: each trial splits the built-in ``python-stdlib`` corpus's records at random into two
disjoint halves, draws the "served prompts" as windows of one half (line starts, lengths log-uniform
in [16, 400] chars) and tests them against the other half exactly as ``lmops monitor`` tests prompts
against the champion's training data (``lmcore.feedback.monitor.prompt_drift`` with params.yaml's
``monitor`` slice and a seed of its own per trial). The flagged share estimates the false-alarm rate,
which the permutation test should hold at ``monitor.alpha``.

Detection: the same, with a share of the prompts replaced by shifted ones: English prose
(tinyshakespeare) or third-party Python (the installed site-packages, same language, other authors).

    python bench/monitor_drift.py [--trials 200] [--prompts 100] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared/data/tinyshakespeare.txt"
SHIFTS = (("prose", 1.0), ("prose", 0.5), ("prose", 0.25), ("prose", 0.1),
          ("site-packages", 1.0), ("site-packages", 0.5), ("site-packages", 0.25))


def _lengths(rng: random.Random, n: int) -> list[int]:
    return [int(math.exp(rng.uniform(math.log(16), math.log(400)))) for _ in range(n)]


def _site_packages_texts(limit: int = 400, chars: int = 2000) -> list[str]:
    """Chunks of third-party Python sources (a deterministic choice of the installed packages)."""
    root = Path(sysconfig.get_paths()["purelib"])
    out = []
    for pkg in ("requests", "httpx", "fastapi", "typer", "rich", "yaml", "sqlalchemy", "pandas", "optuna", "mlflow"):
        for path in sorted((root / pkg).rglob("*.py"))[:40]:
            text = path.read_text(encoding="utf-8", errors="replace")
            out += [text[i:i + chars] for i in range(0, min(len(text), 4 * chars), chars)]
        if len(out) >= limit:
            break
    return out[:limit]


def _wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p = k / n
    d = 1 + z * z / n
    c = p + z * z / (2 * n)
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (c - h) / d, (c + h) / d


def run_trials(records, shifted, share, trials, n_prompts, cfg, seed0):
    from lmcore.feedback.monitor import prompt_drift, reference_windows

    flagged, ps = 0, []
    for t in range(trials):
        rng = random.Random(seed0 + t)
        order = list(range(len(records)))
        rng.shuffle(order)
        half = len(order) // 2
        ref = [records[i] for i in order[:half]]
        other = [records[i] for i in order[half:]]
        n_shift = round(share * n_prompts)
        prompts = reference_windows(other, _lengths(rng, n_prompts - n_shift), rng.randrange(1 << 30))
        if n_shift:
            prompts += reference_windows(shifted, _lengths(rng, n_shift), rng.randrange(1 << 30))
        d = prompt_drift(prompts, ref, dataclasses.replace(cfg, seed=rng.randrange(1 << 30)))
        flagged += d.drifted
        ps.append(d.p_value)
    lo, hi = _wilson(flagged, trials)
    return {"flagged": flagged, "trials": trials, "rate": flagged / trials, "ci95": [round(lo, 4), round(hi, 4)],
            "p_at_most": {q: round(sum(x <= q for x in ps) / trials, 4) for q in (0.01, 0.05, 0.1, 0.5)}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=200, help="trials for the false-alarm rate")
    p.add_argument("--power-trials", type=int, default=50, help="trials per shift")
    p.add_argument("--prompts", type=int, default=100, help="served prompts per trial")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from _common import cpu_header, with_cpu

    from lmcore.config import load_params
    from lmcore.data.sources import stdlib_records

    cpu_header()
    cfg = load_params(ROOT / "params.yaml").monitor
    data = load_params(ROOT / "params.yaml").data
    records = [t for t, _, _ in stdlib_records(data.record_chars, data.stdlib_max_records)]
    prose = CORPUS.read_text(encoding="utf-8") if CORPUS.is_file() else ""
    shifted = {"prose": [prose[i:i + 2000] for i in range(0, len(prose), 2000)],
               "site-packages": _site_packages_texts()}
    print(f"{len(records)} stdlib records; {args.prompts} prompts per trial; alpha {cfg.alpha}; "
          f"{cfg.permutations} permutations; {cfg.ngram}-grams, {cfg.max_features} features", flush=True)
    t0 = time.perf_counter()
    far = run_trials(records, [], 0.0, args.trials, args.prompts, cfg, 0)
    per_trial = (time.perf_counter() - t0) / args.trials
    print(f"false alarms (same distribution): {far['flagged']}/{far['trials']} = {far['rate']:.3f} "
          f"(95% CI {far['ci95'][0]:.3f}-{far['ci95'][1]:.3f}); {per_trial * 1000:.0f} ms per test", flush=True)
    print("  share of p-values at most q (uniform: q): "
          + ", ".join(f"{q}: {v:.3f}" for q, v in far["p_at_most"].items()), flush=True)
    power = {}
    for name, share in SHIFTS:
        if not shifted[name] or args.power_trials < 1:
            continue
        r = run_trials(records, shifted[name], share, args.power_trials, args.prompts, cfg, 10_000)
        power[f"{name}@{share:g}"] = r
        print(f"detected {name} in {share:.0%} of prompts: {r['flagged']}/{r['trials']} = {r['rate']:.2f}", flush=True)
    result = {"alpha": cfg.alpha, "prompts": args.prompts, "false_alarm": far, "power": power,
              "ms_per_test": round(per_trial * 1000, 1)}
    if args.json:
        print(json.dumps(with_cpu(result)))


if __name__ == "__main__":
    main()
