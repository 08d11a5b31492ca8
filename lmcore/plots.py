"""Figures for runs: the loss curve from ``history.csv`` (matplotlib, headless Agg backend)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any


def read_history(path: str | Path) -> list[dict[str, float | None]]:
    """Rows of a training ``history.csv`` with numbers parsed (blank cells -> None)."""
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for raw in csv.DictReader(f):
            rows.append({k: (float(v) if v not in (None, "", "None") else None) for k, v in raw.items()})
    return rows


def loss_curve(history_csv: str | Path, title: str = "loss") -> Any:
    """A matplotlib Figure of train (and val) loss per step; the caller logs/saves and closes it."""
    import matplotlib  # lazy: matplotlib imports in ~0.9 s, paid only when plotting

    matplotlib.use("Agg", force=False)
    # lazy: matplotlib imports in ~0.9 s, paid only when plotting
    from matplotlib.figure import Figure  # a bare Figure: no pyplot global state, thread-safe

    rows = read_history(history_csv)
    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    for key, style in (("train_loss", "-"), ("val_loss", "o-")):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None and r.get("step") is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=key.replace("_", " "), markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    return fig


def save_loss_curve(history_csv: str | Path, out_png: str | Path, title: str = "loss") -> Path:
    """Write the loss curve PNG atomically."""
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.png")
    loss_curve(history_csv, title).savefig(tmp, format="png")
    tmp.replace(out)
    return out
