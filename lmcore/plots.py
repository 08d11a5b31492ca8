"""Figures: the loss curve from ``history.csv``, the monitoring page's charts (matplotlib, headless Agg backend)."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def read_history(path: str | Path) -> list[dict[str, float | None]]:
    """Rows of a training ``history.csv`` with numbers parsed (blank cells -> None)."""
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for raw in csv.DictReader(f):
            rows.append({k: (float(v) if v not in (None, "", "None") else None) for k, v in raw.items()})
    return rows


def _figure(width: float = 6.4, height: float = 3.2) -> Any:
    """An empty matplotlib Figure on the Agg backend, outside pyplot (thread-safe)."""
    import matplotlib  # lazy: matplotlib imports in ~0.9 s, paid only when plotting

    matplotlib.use("Agg", force=False)
    # lazy: matplotlib imports in ~0.9 s, paid only when plotting
    from matplotlib.figure import Figure  # a bare Figure: no pyplot global state, thread-safe

    return Figure(figsize=(width, height), dpi=100)


def loss_curve(history_csv: str | Path, title: str = "loss") -> Any:
    """A matplotlib Figure of train (and val) loss per step; the caller logs/saves and closes it."""
    rows = read_history(history_csv)
    fig = _figure(6.4, 4.0)
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


def _bars(title: str, ylabel: str, labels: list[str], series: dict[str, list[float | None]],
          empty: str, ylim: tuple[float, float] | None = None) -> Any:
    """Grouped bars: one group per label, one bar per series (None: no bar); ``empty`` when no bar at all."""
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j, v in enumerate(values) if v is not None]
        if xs:
            ax.bar(xs, [v for v in values if v is not None], width, label=name, color=f"C{i}")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlim(-0.5, max(len(labels), 1) - 0.5)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    if ylim is not None:
        ax.set_ylim(*ylim)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    else:
        ax.text(0.5, 0.5, empty, ha="center", transform=ax.transAxes)
    fig.tight_layout()
    return fig


def monitor_figures(history: list[dict[str, Any]], versions: list[dict[str, Any]]) -> list[Any]:
    """The monitoring page's figures: drift per monitor run (``lmcore.feedback.monitor`` reports, oldest
    first), and the 👎/correction rates and latency percentiles per model version (``VersionStats.to_dict()``)."""
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    tested = [r for r in history if r["drift"]["divergence"] is not None]
    when = [datetime.fromtimestamp(r["at"], UTC) for r in tested]
    ax.plot(when, [r["drift"]["divergence"] for r in tested], "o-", markersize=3, label="divergence")
    ax.plot(when, [r["drift"]["threshold"] for r in tested], "--", label="threshold (1 - alpha quantile)")
    flagged = [(w, r["drift"]["divergence"]) for w, r in zip(when, tested, strict=True) if r["drift"]["drifted"]]
    if flagged:
        ax.plot([w for w, _ in flagged], [d for _, d in flagged], "o", color="tab:red", label="drift flagged")
    ax.set_title("prompt drift vs the champion's training data")
    ax.set_ylabel("Jensen-Shannon divergence (bits)")
    ax.grid(alpha=0.3)
    if tested:
        ax.legend()
        fig.autofmt_xdate()
    else:
        ax.text(0.5, 0.5, "no monitor run has tested drift yet (lmops monitor)", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    labels = [f"v{v['version']}" for v in versions]
    rates = _bars("ratings per model version", "share of ratings", labels,
                  {"thumbs down": [v["thumbs_down_rate"] for v in versions],
                   "corrected": [v["correction_rate"] for v in versions]}, "no ratings in the window", (0.0, 1.0))
    latency = _bars("latency per model version", "ms", labels,
                    {q: [v["latency_ms"][q] for v in versions] for q in ("p50", "p90", "p99")},
                    "no generations in the window")
    return [fig, rates, latency]


def figure_svg(fig: Any) -> str:
    """A figure as an inline ``<svg>`` element (no XML prolog), for HTML pages."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    text = buf.getvalue()
    return text[text.index("<svg"):]
