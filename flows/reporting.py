"""What a flow run tells people: Prefect artifacts for the UI, a short summary for the terminal."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.logging import get_run_logger

from lmcore.settings import MLFLOW_PORT

METRIC_KEYS = ("val_loss", "perplexity", "bits_per_byte", "accuracy")


@contextmanager
def stage(index: int, total: int, name: str) -> Iterator[dict[str, str]]:
    """Announce a step on stderr (the terminal) and in the flow run's log (the Prefect UI).

    The caller may set ``note["done"]`` to say what the step produced.
    """
    logger = get_run_logger()
    sys.stderr.write(f"[{index}/{total}] {name} ...\n")
    sys.stderr.flush()
    note: dict[str, str] = {}
    t0 = time.monotonic()
    yield note
    line = f"[{index}/{total}] {name}: {note.get('done', 'done')} ({time.monotonic() - t0:.1f} s)"
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    logger.info(line)


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def mlflow_run_link(run_id: str) -> str:
    """Where the run is in the MLflow UI that `lmops ui` starts."""
    return f"http://127.0.0.1:{MLFLOW_PORT}/#/experiments/0/runs/{run_id}"


def summary_markdown(s: dict[str, Any]) -> str:
    d, g, m = s["dataset"], s["gate"], s["metrics"]
    champion = g.get("champion") or "none"
    lines = [
        f"# Training run: {s['model_name']} v{s['model_version']}",
        "",
        f"- **Dataset version** `{d['version']}` (git `{d.get('git_rev') or '-'}`): "
        f"{d['rows']} rows read this run, {d['accepted']} accepted, {d['quarantined']} quarantined",
        f"- **Training**: {s['train']['steps']} steps in {s['train']['seconds']} s"
        f" ({'cached, not retrained' if s['cached']['train'] else 'trained this run'}); resolved on this machine: "
        + ", ".join(f"{k} `{v}`" for k, v in (s["train"].get("choices") or {}).items()),
        f"- **MLflow run** `{s['train']['run_id']}` ({mlflow_run_link(s['train']['run_id'])})",
        f"- **Gate**: {'PROMOTED' if g['promoted'] else 'kept champion'}: {g['reason']}",
        f"- **Deploy**: {s['deploy']}",
        "",
        "| metric | challenger | champion |",
        "|---|---|---|",
        f"| bits per byte | {_fmt(g.get('challenger_bpb'))} | {_fmt(g.get('champion_bpb'))} (v{champion}) |",
    ]
    lines += [f"| {k} | {_fmt(m[k])} | |" for k in METRIC_KEYS if k in m and k != "bits_per_byte"]
    return "\n".join(lines)


def publish_summary(summary: dict[str, Any]) -> None:
    """Markdown summary + metrics table as artifacts of the current flow run."""
    create_markdown_artifact(summary_markdown(summary), key="training-summary", description="lmops training run")
    rows = [{"metric": k, "value": summary["metrics"][k]} for k in METRIC_KEYS if k in summary["metrics"]]
    create_table_artifact(rows, key="training-metrics", description="evaluation metrics of the challenger")


def terminal_summary(s: dict[str, Any]) -> str:
    g, m = s["gate"], s["metrics"]
    verdict = "became champion" if g["promoted"] else "did not beat the champion"
    return "\n".join([
        f"dataset   {s['dataset']['version']}  ({s['dataset']['accepted']} accepted, "
        f"{s['dataset']['quarantined']} quarantined this run)",
        f"model     {s['model_name']} v{s['model_version']}  {verdict}: {g['reason']}",
        "metrics   " + "  ".join(f"{k}={_fmt(m[k])}" for k in METRIC_KEYS if k in m),
        f"training  {'cached (no training work)' if s['cached']['train'] else str(s['train']['steps']) + ' steps'}",
        f"deploy    {s['deploy']}",
        "next      lmops ui      # MLflow + Prefect UIs",
        "          lmops serve   # serve the champion with a playground at http://127.0.0.1:8000/",
    ])
