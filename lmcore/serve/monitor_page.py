"""The playground's ``/monitor`` page: server-rendered charts (inline SVG, no JavaScript, no CDN).

Ratings and latency per model version are read live from the server's feedback store over
``monitor.window_hours``; the drift chart plots the reports ``lmops monitor`` saved (the flow's history
under the lmops home), since drift needs the champion's training data, which the server does not load.
"""

from __future__ import annotations

import html
import time
from typing import Any

from lmcore.feedback.monitor import load_history, report_lines, version_stats
from lmcore.plots import figure_svg, monitor_figures
from lmcore.serve.state import ServeState


def _version_rows(versions: list[dict[str, Any]], served: str | None) -> str:
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.1%}"

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    rows = []
    for v in versions:
        lat = v["latency_ms"]
        star = " (served)" if v["version"] == served else ""
        rows.append(f"<tr><td>v{html.escape(v['version'])}{star}</td><td>{v['generations']}</td><td>{v['ratings']}</td>"
                    f"<td>{pct(v['thumbs_down_rate'])}</td><td>{pct(v['correction_rate'])}</td>"
                    f"<td>{ms(lat['p50'])}</td><td>{ms(lat['p90'])}</td><td>{ms(lat['p99'])}</td></tr>")
    return "".join(rows) or '<tr><td colspan="8">no generations in the window</td></tr>'


def monitor_html(state: ServeState) -> str:
    """The whole page for the app behind ``state``."""
    cfg = state.params.monitor
    versions = [] if state.store is None else [
        v.to_dict() for v in version_stats(state.store, time.time() - cfg.window_hours * 3600)]
    history = load_history(state.settings.home)
    charts = "".join(f'<section class="card chart">{figure_svg(f)}</section>'
                     for f in monitor_figures(history, versions))
    latest = ("<pre>" + html.escape("\n".join(report_lines(history[-1]))) + "</pre>" if history
              else "<p>No monitor run yet: <code>lmops monitor</code> (or <code>lmops schedule</code>) writes one.</p>")
    served = state.engine.health().get("model_version")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>lmops monitoring</title><link rel="stylesheet" href="/static/style.css"></head>
<body><header><h1>lmops <span>monitoring</span></h1><a class="pill" href="/">playground</a></header>
<main>
<section class="card"><label>Latest monitor run</label>{latest}</section>
<section class="card"><label>Model versions, last {cfg.window_hours:g} h (live)</label>
<table class="stats"><thead><tr><th>version</th><th>generations</th><th>ratings</th><th>👎 rate</th>
<th>correction rate</th><th>p50 ms</th><th>p90 ms</th><th>p99 ms</th></tr></thead>
<tbody>{_version_rows(versions, served)}</tbody></table></section>
{charts}
</main></body></html>"""
