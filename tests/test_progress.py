"""Long work reports its progress with an ETA to a log (``say``), as it does on a terminal with a bar."""

from __future__ import annotations

import pytest

from lmcore.progress import Progress

pytestmark = pytest.mark.code


def test_progress_says_its_eta_at_most_every_interval_and_at_the_end():
    lines: list[str] = []
    with Progress(4, "evaluate", "window", lines.append, every_s=3600) as p:
        for _ in range(4):
            p.update()
    assert lines == [lines[-1]] and lines[-1].startswith("evaluate: 4/4 windows (") and "ETA 0 s" in lines[-1]
    lines.clear()
    with Progress(3, "gate", "step", lines.append, every_s=0) as p:
        p.update()
        p.update(2)
    assert [line.split(" (")[0] for line in lines] == ["gate: 1/3 steps", "gate: 3/3 steps"]

