"""Percentile pruning vs none: a 20-trial Optuna sweep, same sampler seed, same trial budget.

Both sweeps search the same space (lr, warmup, width, depth, batch size) for a tiny
byte-level model on the first 200k characters of tinyshakespeare (90/10 split), each
trial ``--steps`` training steps. The pruned sweep is what ``lmops optimize sweep`` runs:
``params.yaml``'s ``optimize`` slice decides how often a trial reports its validation loss
(``trial_eval_interval``) and when the pruner stops it (``make_pruner``: outside the best
``prune_percentile`` percent of completed trials at the same step, after ``startup_trials``);
the other sweep runs every trial to the end. ``--reports``, ``--startup`` and ``--percentile``
override those settings for both sweeps. Sweeps run in alternating order over ``--repeats``
rounds; medians.

    python bench/sweep.py [--json] [--threads N] [--trials 20] [--steps 100] [--repeats 2]

Prints ``time_ratio`` (pruned wall time / unpruned wall time; target <= 0.6) and both best
validation losses (target: the same within noise). The noise: the full sweep's best config
retrained with ``--noise-seeds`` other ``train.seed`` values; ``best_loss_within_noise`` when the
two best losses differ by at most that std.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from _common import CORPUS, ROOT, cpu_header, parser, setup, with_cpu

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


def _seed_noise(params, data_dir: Path, best_params: dict, seeds: int, work: Path) -> float:
    """Std of one config's final val loss over ``train.seed`` 1..seeds.

    Init and batch order alone move a trial's loss this much, so two sweeps' best losses that
    differ by less are the same within noise.
    """
    from lmcore.optimize.sweep import trial_params
    from lmcore.training.loop import train

    losses = []
    for seed in range(1, seeds + 1):
        p = trial_params(params, {**best_params, "train.seed": seed})
        losses.append(train(data_dir, work / f"noise-{seed}", p.model, p.train, progress=False).final_val_loss)
    return statistics.stdev(losses)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--steps", type=int, default=100, help="training steps per trial")
    p.add_argument("--reports", type=int, help="validation-loss reports per trial (default: params.yaml's)")
    p.add_argument("--startup", type=int, help="trials the pruner lets complete first (default: params.yaml's)")
    p.add_argument("--percentile", type=float, help="prune outside this best percent (default: params.yaml's)")
    p.add_argument("--seed", type=int, default=1234, help="TPE sampler seed (both sweeps)")
    p.add_argument("--noise-seeds", type=int, default=5, help="train seeds of the full sweep's best config, for "
                   "the noise of one trial's val loss")
    args = p.parse_args()
    setup(args)
    cpu_header()
    with tempfile.TemporaryDirectory(prefix="lmops-bench-sweep-") as tmp:
        tmp = Path(tmp)
        os.environ["LMOPS_HOME"] = str(tmp / "home")
        from lmcore.config import load_params
        from lmcore.data.prepare import prepare_split_texts
        from lmcore.optimize.sweep import run_sweep, trial_eval_interval

        text = CORPUS.read_text(encoding="utf-8")[:200_000]
        cut = int(len(text) * 0.9)
        overrides = {
            "tokenizer.kind": "byte", "model.n_head": 2, "model.n_kv_head": 2, "model.block_size": 64,
            "train.device": "cpu", "train.max_minutes": 0, "train.eval_iters": 2, "train.min_lr": 1e-5,
            "optimize.trial_max_steps": args.steps, "optimize.search_space": SPACE,
        }
        if args.reports:
            overrides["optimize.trial_eval_interval"] = max(1, args.steps // args.reports)
        if args.startup is not None:
            overrides["optimize.startup_trials"] = args.startup
        if args.percentile is not None:
            overrides["optimize.prune_percentile"] = args.percentile
        params = load_params(ROOT / "params.yaml", overrides)
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
        noise = _seed_noise(params, data.dir, runs["full"][0][1].best_params, args.noise_seeds, tmp / "work")
        result = {
            "trials": args.trials,
            "steps_per_trial": args.steps,
            "eval_interval": trial_eval_interval(params.optimize),
            "startup_trials": params.optimize.startup_trials,
            "prune_percentile": params.optimize.prune_percentile,
            "threads": args.threads,
            "pruned_seconds": round(t_pruned, 1),
            "full_seconds": round(t_full, 1),
            "time_ratio": round(t_pruned / t_full, 3),
            "best_val_loss_pruned": round(best_pruned, 4),
            "best_val_loss_full": round(best_full, 4),
            "best_loss_change": round((best_pruned - best_full) / best_full, 4),
            "best_loss_seed_sd": round(noise, 4),
            "best_loss_within_noise": abs(best_pruned - best_full) <= noise,
            "trials_pruned": runs["pruned"][0][1].pruned,
            # noise-free view of the same saving: training steps actually run, pruned / full
            "steps_ratio": round(_steps(runs["pruned"][0][1]) / _steps(runs["full"][0][1]), 3),
        }
    print(f"pruned sweep {result['pruned_seconds']}s ({result['trials_pruned']} of {args.trials} pruned), "
          f"full sweep {result['full_seconds']}s: time_ratio {result['time_ratio']}")
    print(f"best val_loss: pruned {result['best_val_loss_pruned']}, full {result['best_val_loss_full']} "
          f"(one config's sd over {args.noise_seeds} train seeds: {result['best_loss_seed_sd']})")
    print("  ".join(f"{k}={v}" for k, v in result.items()))
    if args.json:
        print(json.dumps(with_cpu(result)))


if __name__ == "__main__":
    main()
