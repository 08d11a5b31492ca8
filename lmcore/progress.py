"""Progress of long work, for a person at a terminal and for a log (Prefect's task log, CI output).

Why both: a bar redraws one line, which a log file or the Prefect UI cannot show, and a log line per step
floods a terminal. So: a ``tqdm`` bar (with its ETA) when stderr is a terminal, and, when the caller passes
``say`` (the flows pass one that writes the terminal and the task's log), a line with the ETA at most every
``every_s`` seconds and at the end.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from tqdm.auto import tqdm

Say = Callable[[str], None]


class Progress:
    """``with Progress(total, "evaluate", "window", say) as p: ... p.update(n)``."""

    def __init__(self, total: int, desc: str, unit: str = "it", say: Say | None = None, every_s: float = 10.0):
        self.total, self.desc, self.unit, self.say, self.every_s = max(total, 0), desc, unit, say, every_s
        self.done, self.t0, self.said_at = 0, time.perf_counter(), time.perf_counter()
        self.bar = tqdm(total=self.total, desc=desc, unit=unit, dynamic_ncols=True, leave=False, file=sys.stderr,
                        disable=not sys.stderr.isatty())

    def update(self, n: int = 1) -> None:
        self.done += n
        self.bar.update(n)
        now = time.perf_counter()
        if self.say and (now - self.said_at >= self.every_s or self.done >= self.total):
            self.said_at = now
            self.say(self.line())

    def line(self) -> str:
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        return f"{self.desc}: {self.done}/{self.total} {self.unit}s ({elapsed:.0f} s, ETA {eta:.0f} s)"

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()
