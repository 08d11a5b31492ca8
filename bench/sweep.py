"""Median pruning vs none: a 20-trial Optuna sweep, same sampler seed, same trial budget.

Both sweeps search the same space (lr, warmup, width, depth, batch size) for a tiny
byte-level model on the first 200k characters of tinyshakespeare (90/10 split), each
trial ``--steps`` training steps with validation loss reported ``--reports`` times. The
pruned sweep stops trials whose intermediate validation loss is worse than the median of
earlier trials at the same step (``optuna.pruners.MedianPruner``); the other runs every
trial to the end. Sweeps run in alternating order over ``--repeats`` rounds; medians.

    python bench/sweep.py [--json] [--threads N] [--trials 20] [--steps 100] [--repeats 2]

Prints ``time_ratio`` (pruned wall time / unpruned wall time; target <= 0.6) and both best
validation losses (target: the same within noise).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from _common import CORPUS, ROOT, parser, setup

SPACE = {
    "lr": {"low": 3.0e-4, "high": 3.0e-2, "log": True},
    "warmup_steps": {"low": 0, "high": 20},
    "d_model": {"choices": [32, 64]},
    "n_layer": {"low": 1, "high": 3},
    "batch_size": {"choices": [8, 16]},
}


def _steps(result) -> int:
    """Training steps a sweep ran: a trial's last reported step (pruned trials stop there)."""
    return sum(int(t["last_step"] or 0) for t in result.trials)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--steps", type=int, default=100, help="training steps per trial")
    p.add_argument("--reports", type=int, default=10, help="validation-loss reports per trial")
    p.add_argument("--startup", type=int, default=3, help="trials the pruner lets finish first")
    p.add_argument("--seed", type=int, default=1234, help="TPE sampler seed (both sweeps)")
    args = p.parse_args()
    setup(args)
    with tempfile.TemporaryDirectory(prefix="lmops-bench-sweep-") as tmp:
        tmp = Path(tmp)
        os.environ["LMOPS_HOME"] = str(tmp / "home")
        from lmcore.config import load_params
        from lmcore.optimize.sweep import run_sweep
        from lmcore.prepare import prepare_split_texts

        text = CORPUS.read_text(encoding="utf-8")[:200_000]
        cut = int(len(text) * 0.9)
        params = load_params(ROOT / "params.yaml", {
            "tokenizer.kind": "byte", "model.n_head": 2, "model.n_kv_head": 2, "model.block_size": 64,
            "train.device": "cpu", "train.max_minutes": 0, "train.eval_iters": 2, "train.min_lr": 1e-5,
            "optimize.trial_max_steps": args.steps, "optimize.trial_eval_interval": max(1, args.steps // args.reports),
            "optimize.startup_trials": args.startup, "optimize.search_space": SPACE,
        })
        data = prepare_split_texts([text[:cut]], [text[cut:]], tmp / "data", params.tokenizer)
        # warm-up: the first trial in a process pays one-off imports (torch._dynamo via AdamW, ~10 s)
        run_sweep(params, data.dir, trials=1, study_name="warmup", storage=f"sqlite:///{tmp / 'warmup.db'}",
                  track=False, work_dir=tmp / "work")
        runs: dict[str, list] = {"pruned": [], "full": []}
        for r in range(args.repeats or 2):  # alternate the order: load from other processes hits both
            for name in ("pruned", "full") if r % 2 == 0 else ("full", "pruned"):
                t0 = time.perf_counter()
                res = run_sweep(params, data.dir, trials=args.trials, study_name=f"{name}-{r}", seed=args.seed,
                                storage=f"sqlite:///{tmp / f'{name}-{r}.db'}", pruning=name == "pruned", track=False,
                                work_dir=tmp / "work")
                runs[name].append((time.perf_counter() - t0, res))
        t_pruned = statistics.median(t for t, _ in runs["pruned"])
        t_full = statistics.median(t for t, _ in runs["full"])
        best_pruned = statistics.median(r.best_value for _, r in runs["pruned"])
        best_full = statistics.median(r.best_value for _, r in runs["full"])
        result = {
            "trials": args.trials,
            "steps_per_trial": args.steps,
            "threads": args.threads,
            "pruned_seconds": round(t_pruned, 1),
            "full_seconds": round(t_full, 1),
            "time_ratio": round(t_pruned / t_full, 3),
            "best_val_loss_pruned": round(best_pruned, 4),
            "best_val_loss_full": round(best_full, 4),
            "best_loss_change": round((best_pruned - best_full) / best_full, 4),
            "trials_pruned": runs["pruned"][0][1].pruned,
            # noise-free view of the same saving: training steps actually run, pruned / full
            "steps_ratio": round(_steps(runs["pruned"][0][1]) / _steps(runs["full"][0][1]), 3),
        }
    print(f"pruned sweep {result['pruned_seconds']}s ({result['trials_pruned']} of {args.trials} pruned), "
          f"full sweep {result['full_seconds']}s: time_ratio {result['time_ratio']}")
    print(f"best val_loss: pruned {result['best_val_loss_pruned']}, full {result['best_val_loss_full']}")
    print("  ".join(f"{k}={v}" for k, v in result.items()))
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
