"""Inter-process locks on files under the lmops home: one writer at a time, crash-safe.

``fcntl.flock`` locks die with their process, so a killed run never leaves a stale lock.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lmcore.errors import LmopsError


@contextmanager
def file_lock(path: str | Path, timeout_s: float = 600.0, poll_s: float = 0.2) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the ``with`` block."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LmopsError(f"timed out after {timeout_s:.0f} s waiting for lock {path}") from None
                time.sleep(poll_s)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


_held = threading.local()  # the lock files this thread holds, with how deeply


@contextmanager
def reentrant_file_lock(path: str | Path, timeout_s: float = 600.0) -> Iterator[None]:
    """:func:`file_lock` that a thread already holding it may take again (a flow holds the registry lock
    around register + gate, and the gate takes it itself): other threads and processes still wait."""
    key = str(Path(path).resolve())
    depth = getattr(_held, "depth", None)
    if depth is None:
        depth = _held.depth = {}
    if depth.get(key):
        depth[key] += 1
        try:
            yield
        finally:
            depth[key] -= 1
        return
    with file_lock(path, timeout_s):
        depth[key] = 1
        try:
            yield
        finally:
            del depth[key]
